"""Counting host reads: the calls that move tensor values from the device to the host.

``HostReads`` is a ``TorchFunctionMode`` that records every such call made by Python code while
it is active, with where it came from::

    with HostReads() as reads:
        fx.fit(state, step, data, max_steps=100)
    assert reads.count == 1, reads.report()

``reads.reads`` is the list of the calls' names (what the old ``CountReads`` mode kept),
``reads.calls`` the ``Read`` records, ``reads.report()`` a summary by place for assertion messages.

What counts (a "read"): a call that, with the tensor on an accelerator, copies its values to the
host and so waits for the device. CI has no accelerator, so the rules are written for tensors
that stand for device tensors while living on the CPU.

- values: ``item``, ``tolist``, ``__bool__`` (``if t:``, ``not t``, ``and``/``or``),
  ``__float__``, ``__int__``, ``__index__``, ``__complex__``, ``__contains__`` (``x in t``),
  ``__format__`` and ``__repr__`` (f-strings, printing), ``torch.equal``, ``allclose`` and
  ``is_nonzero`` (they answer a Python bool);
- transfers: ``cpu()``, and ``to`` a CPU target written as a string (``t.to("cpu")``), even from
  the CPU, where they are no-ops; ``to`` a ``torch.device`` or a tensor on the CPU only from
  another device (``t.to(x.device)`` is the idiom for "stay on the state's device", which names
  the CPU on CI too); ``copy_`` into a CPU tensor from another device; pickling a tensor of
  another device (``__reduce_ex__``: ``torch.save``, objects sent between ranks);
  ``numpy(force=True)``;
- syncs on data-dependent shapes: ``nonzero``, ``argwhere``, ``masked_select``, ``unique``,
  ``unique_consecutive``, ``bincount``, one-argument ``where``, ``repeat_interleave`` with tensor
  repeats and no ``output_size``, indexing (``t[mask]``, ``t[mask] = v``) with a bool mask.

What does not count: metadata (``shape``, ``len``, ``dtype``, ``device``, ``numel``,
``data_ptr``); ``numpy()`` and ``__array__`` (on an accelerator they raise rather than copy; on
the CPU they are zero-copy views); and reads of host-resident tensors, which no machine has to
copy. A tensor is host-resident when it is

- a field of a data position (``fx.data.DataPosition``, ``LoaderPosition``: 0-d CPU tensors by
  contract), found through ``gc`` referrers when a 0-d integer CPU tensor is read;
- the result of a counted transfer, so ``t.cpu().numpy()`` and ``float(t.to("cpu"))`` count
  once, as the one copy they make on an accelerator (on the CPU ``cpu()`` and ``to("cpu")``
  return the tensor itself; under the mode they return an alias, ``view_as``, so that the alias
  is marked and the source is not);
- drawn from a CPU ``torch.Generator`` by a factory (``Batches``' epoch order: ``randperm``);
- computed only from host-resident tensors (``torch.stack([f.cpu() ...]).any()``), by any call
  that does not move tensors (not ``to``, ``cuda``, ``copy_``, ``type``, nor one given a
  ``device``).
The reads skipped that way are kept in ``ignored``.

Not seen: reads made inside C++ or compiled kernels (Inductor's code), and explicit waits
(``torch.cuda.synchronize``), which need a device anyway.

Compiled code. Dynamo guards on the torch-function mode stack, so the first call of a compiled
function under ``HostReads`` compiles it once more (the guard checks the modes' types, not the
instances: later calls under any ``HostReads`` reuse that compilation). ``__torch_function__``
steps aside while Dynamo traces (``torch.compiler.is_compiling()``), so the mode adds no graph
break (``fullgraph=True`` still compiles) and the graph computes what the one traced without it
computes. With the ``"eager"`` backend (or ``recording_backend``) the graph's ops run through the
mode at run time and are checked like eager code; with Inductor they are not seen, so also check
the captured graph with ``graph_syncs``, which lists the nodes of an FX graph that read.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fxtrain.data import DataPosition, LoaderPosition

__all__ = ["HostReads", "Read", "graph_syncs", "recording_backend", "VALUE_READS", "SYNC_OPS"]

VALUE_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                         "__complex__", "__contains__", "__format__", "__repr__", "equal",
                         "allclose", "is_nonzero"})
SYNC_OPS = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                      "bincount", "_unique2", "_unique"})
_HOST_TYPES = (DataPosition, LoaderPosition)
_HOST_FIELDS = [{f.name for f in dataclasses.fields(t)} for t in _HOST_TYPES]
_MOVES = frozenset({"to", "cuda", "_to_copy", "copy_", "type"})  # may leave the host
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_THIS_FILE)) + os.sep


@dataclasses.dataclass(frozen=True)
class Read:
    """One host read: the call's name, its kind (value, transfer, sync), where it was made (the
    first frame outside torch and this file) and a few callers, and the tensor's description."""

    name: str
    kind: str
    where: str
    stack: tuple[str, ...]
    tensor: str

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}) of {self.tensor} at {' <- '.join(self.stack)}"


def _name(func: Any) -> str:
    return getattr(func, "__name__", "") or ""


def _is_cpu(device: Any) -> bool:
    return torch.device(device).type == "cpu"


def _to_target(args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """The device ``Tensor.to`` moves to (None: stays), and whether it was written as a string."""
    target = kwargs.get("device")
    if target is None:
        for a in args[1:]:
            if isinstance(a, str | torch.device):
                target = a
                break
            if isinstance(a, torch.Tensor):
                target = a.device
                break
    return target, isinstance(target, str)


def _transfer(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call copies a tensor to the host (see the module's docstring)."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if src is None:
        return False
    if name == "cpu":
        return True
    if name == "numpy":
        return bool(kwargs.get("force") or (len(args) > 1 and args[1]))
    if name == "to":
        target, literal = _to_target(args, kwargs)
        if target is None or not _is_cpu(target):
            return False
        return literal or not _is_cpu(src.device)
    if name == "__reduce_ex__":  # pickling (torch.save, sending objects between ranks)
        return not _is_cpu(src.device)
    if name == "copy_":
        other = args[1] if len(args) > 1 else kwargs.get("src")
        return (isinstance(other, torch.Tensor) and _is_cpu(src.device)
                and not _is_cpu(other.device))
    return False


def _bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call's output shape depends on tensor values (a sync on an accelerator)."""
    if name in SYNC_OPS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if len(args) == 1 and not kwargs:  # torch.repeat_interleave(repeats)
            repeats = args[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__"):
        return len(args) > 1 and _bool_mask(args[1])
    return False


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among the arguments, one level into lists and tuples (``stack``, ``cat``)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, list | tuple):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _drawn_on_host(args: tuple, kwargs: dict) -> bool:
    """A factory call drawing from a CPU ``torch.Generator`` (``Batches``' epoch order): its
    result is on the host in any run."""
    g, device = kwargs.get("generator"), kwargs.get("device")
    return (isinstance(g, torch.Generator) and g.device.type == "cpu"
            and (device is None or _is_cpu(device)) and not _tensors(args, kwargs))


def _results(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, list | tuple):
        return [x for x in out if isinstance(x, torch.Tensor)]
    return []


def _is_position(referrer: Any) -> bool:
    """Whether ``referrer`` (of a tensor) is a data position, or the ``__dict__`` of one."""
    if isinstance(referrer, _HOST_TYPES):
        return True
    if not isinstance(referrer, dict) or set(referrer) not in _HOST_FIELDS:
        return False
    return any(isinstance(r, _HOST_TYPES) and r.__dict__ is referrer
               for r in gc.get_referrers(referrer))


def _describe(t: torch.Tensor | None) -> str:
    if t is None:
        return "?"
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}"


def _frames(limit: int = 4) -> tuple[str, ...]:
    """``file:line in function`` of the innermost frames outside torch and this file."""
    out, f = [], sys._getframe(2)
    while f is not None and len(out) < limit:
        path = f.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
            out.append(f"{path.removeprefix(_ROOT)}:{f.f_lineno} in {f.f_code.co_name}")
        f = f.f_back
    return tuple(out) or ("?",)


class HostReads(TorchFunctionMode):
    """Records host reads made while active (see the module's docstring for what counts), on
    this thread (torch-function modes are per thread).

    Attributes:
      calls: the ``Read`` records, in order.
      ignored: reads of host-resident tensors, not counted.
    Properties: ``reads`` (the names, as the old ``CountReads`` had), ``count``, and
    ``report()`` for assertion messages (reads grouped by place).
    """

    def __init__(self):
        super().__init__()
        self.calls: list[Read] = []
        self.ignored: list[Read] = []
        self._host: dict[int, weakref.ref] = {}  # host-resident tensors, by id

    @property
    def reads(self) -> list[str]:
        return [r.name for r in self.calls]

    @property
    def count(self) -> int:
        return len(self.calls)

    def where(self) -> Counter:
        """How many reads each place made: ``{"fxtrain/loop.py:214 in fit": 1, ...}``."""
        return Counter(r.stack[0] for r in self.calls)

    def report(self) -> str:
        lines = [f"{self.count} host reads:"]
        seen = Counter((r.name, r.kind, r.tensor, r.stack) for r in self.calls)
        for (name, kind, tensor, stack), n in seen.items():
            lines.append(f"  {n} x {name} ({kind}) of {tensor} at {' <- '.join(stack)}")
        return "\n".join(lines)

    # -- host residency ---------------------------------------------------------------------

    def _mark(self, t: torch.Tensor) -> None:
        key = id(t)
        self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))

    def _marked(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _host_resident(self, t: torch.Tensor) -> bool:
        if self._marked(t):
            return True
        if t.ndim == 0 and t.device.type == "cpu" and not t.is_floating_point():
            if any(_is_position(r) for r in gc.get_referrers(t)):
                self._mark(t)
                return True
        return False

    # -- the hook ---------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # Dynamo traces through: the graph is unchanged
            return func(*args, **kwargs)
        name = _name(func)
        kind = ("value" if name in VALUE_READS else "transfer" if _transfer(name, args, kwargs)
                else "sync" if _sync(name, args, kwargs) else None)
        if kind is not None:
            self._record(name, kind, args)
        out = func(*args, **kwargs)
        if kind == "transfer" and isinstance(out, torch.Tensor):
            if out is args[0] and name != "copy_":  # a no-op on the CPU: return an alias, so
                out = out.view_as(out)              # the source itself stays unmarked
            self._mark(out)
        elif _drawn_on_host(args, kwargs):
            for r in _results(out):
                self._mark(r)
        elif self._host and name not in _MOVES and "device" not in kwargs:
            inputs = _tensors(args, kwargs)
            if inputs and all(self._marked(t) for t in inputs):
                for r in _results(out):
                    self._mark(r)
        return out

    def _record(self, name: str, kind: str, args: tuple) -> None:
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        stack = _frames()
        read = Read(name, kind, stack[0], stack, _describe(tensor))
        if tensor is not None and self._host_resident(tensor):
            self.ignored.append(read)
        else:
            self.calls.append(read)


# -- compiled graphs ------------------------------------------------------------------------------

def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", "") or str(target)
    return name.split(".")[0] if isinstance(target, torch._ops.OpOverload) else name


def graph_syncs(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of an FX graph (Dynamo's or AOT's) that read values to the host: the calls
    ``HostReads`` counts (``item``, ``tolist``, ``cpu``, ``nonzero``...), ATen's
    ``_local_scalar_dense`` (what ``item`` and ``bool`` lower to), and any node producing an
    unbacked symbol (a Python number taken from tensor data)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = _target_name(node)
        example = node.meta.get("example_value", node.meta.get("val"))
        if (name in VALUE_READS or name in SYNC_OPS or name in ("_local_scalar_dense", "cpu")
                or (name in ("to", "_to_copy") and _graph_transfer(node))
                or (example is not None and free_unbacked_symbols(example))):
            found.append(node.format_node())
    return found


def _graph_transfer(node: torch.fx.Node) -> bool:
    """A graph's ``to`` to the CPU, by the rule ``HostReads`` applies to ``Tensor.to``."""
    targets = [a for a in (*node.args[1:], node.kwargs.get("device"))
               if isinstance(a, str | torch.device)]
    if not targets or not _is_cpu(targets[0]):
        return False
    source = node.args[0].meta.get("example_value") if node.args and isinstance(
        node.args[0], torch.fx.Node) else None
    return isinstance(targets[0], str) or (isinstance(source, torch.Tensor)
                                           and not _is_cpu(source.device))


def recording_backend(graphs: list) -> Any:
    """A ``torch.compile`` backend that runs graphs as the ``"eager"`` backend does and appends
    each captured ``GraphModule`` to ``graphs``."""

    def backend(gm: torch.fx.GraphModule, example_inputs: Iterable) -> Any:
        del example_inputs
        graphs.append(gm)
        return gm.forward

    return backend
