"""Regional compilation inside the one step: a repeated block traced and compiled once, its
graph run for every layer.

``torch.compile`` of a whole train step traces and compiles every layer of a transformer again:
the step's compile time grows with depth. ``fx.regional(state, blocks="auto")`` makes the
model's blocks regions (``torch.compiler.nested_compile_region``: ``fxtrain._torch.regions``):
Dynamo traces the first block's forward into a subgraph, reuses it for the others, and
AOTAutograd and Inductor compile its forward and backward once. The step stays one graph (its
blocks calls of one subgraph), recompiles never after its first call, and trains the same bits:
each layer continues the step's keyed stream where it stands (``fx.random.continued``), so its
dropout masks are those of the step without regions. Each block's optimizer update is a region
too, where the optimizer updates every block alike (``_region_update``).

Dynamo traces a region's first call and reuses that trace for the blocks that share its key
(``regions.nested``'s ``key``): the block's class, its kind and the signature of its tensors
and arguments. So blocks of one kind must compute alike given those: ``regional`` gives blocks
whose Python attributes differ (a sliding window on alternate layers) classes of their own
(``Regional<Name>``, ``Regional<Name>_1``, ...), each traced once. Blocks that differ only in an
int that numbers them (a different value in every block, like transformers' ``layer_idx``) are
checked where the compiled step first calls them (``_Alike``): they share a trace where their
forwards trace to one graph (``layer_idx`` read only for a cache), and are traced apart, by
kind, where the int is read (a scale, a branch, an index), said once. A flag of the module that
names the int (GPT-2's ``scale_attn_by_inverse_layer_idx``) splits them without a check.

A regional step takes autograd's path (``autodiff="auto"`` picks it for a regional state;
``torch.func`` cannot host a region). Eagerly, and in a step on ``torch.func``'s path, the
blocks run as they are. The blocks are the classes' own, under a subclass
(``Regional<Name>``, in a copy of the skeleton): the state's ``layout`` names them and keeps the
skeleton as it was, which evaluation and the trained module run.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import random
from . import _region_update
from .._torch import fake_graphs, regions
from .._torch.inductor import keep_region_outputs
from .._torch.modes import innermost_mode
from .._torch.traced_errors import run_while_tracing


class RegionalBlock:
    """What a block's class adds to the module's own (the first base of ``Regional<Name>``): a
    forward that runs as a region in a compiled autograd step."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return block_forward(self, super().forward, args, kwargs)  # type: ignore[misc]


@functools.cache
def _regional_class(cls: type, kind: int = 0) -> type:
    suffix = f"_{kind}" if kind else ""
    return type(f"Regional{cls.__name__}{suffix}", (RegionalBlock, cls),
                {"__module__": cls.__module__})


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
_MODULE_OWN = frozenset(vars(nn.Module()))  # nn.Module's own fields (its tensors, hooks...)


def _attributes(block: nn.Module) -> dict[tuple[str, str], Any]:
    """The block's Python attributes that its forward may read, by (submodule, name): each
    submodule's class and attributes, private ones included, but for nn.Module's own fields
    (plain values as they are, other objects by identity)."""
    found = {}
    for path, module in block.named_modules():
        found[(path, "__class__")] = type(module)
        for name, value in vars(module).items():
            if name not in _MODULE_OWN:
                plain = isinstance(value, _PLAIN) or (
                    isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))
                found[(path, name)] = value if plain else ("object", id(value))
    return found


def _kinds(blocks: list[nn.Module]) -> tuple[list[int], list[tuple[str, str]]]:
    """Each block's kind among blocks of one class (blocks of one kind have the same
    attributes, but for ints that number them), and those ints, by (submodule, name): whether
    a block's forward reads them is checked where a compiled step first calls it
    (``_Alike``)."""
    seen = [_attributes(b) for b in blocks]
    keys = set().union(*seen)
    numbering = {k for k in keys if all(type(a.get(k)) is int for a in seen)
                 and len({a[k] for a in seen}) == len(seen) > 1
                 and not any(a[f] is True and k[1] in f[1]
                             for a in seen for f in a if f[0] == k[0] and f != k)}
    fingerprints = [tuple(sorted(((k, repr(v)) for k, v in a.items() if k not in numbering),
                                 key=repr)) for a in seen]
    order = list(dict.fromkeys(fingerprints))
    return [order.index(f) for f in fingerprints], sorted(numbering)


class _Alike:
    """Blocks of one kind whose ints that number them differ (``layer_idx``): they share a
    trace only where a check shows that they compute the same thing. Where a compiled step
    first calls them on inputs of one description, each block's forward is traced on fake
    stand-ins (``fake_graphs.graph_code``: no kernels run) and compared with the others': the
    ints read only for a cache (transformers' blocks) give one graph, and the blocks one
    trace; an int read as a scale, a branch or an index gives graphs that differ, and the
    blocks traces of their own (said once). The kinds found are kept here for the
    description (a cache of that pure function, held by the skeleton, gone with it)."""

    def __init__(self, blocks: list[nn.Module], numbering: list[tuple[str, str]]):
        self.blocks, self.numbering, self._found = tuple(blocks), numbering, {}

    def kind(self, block: nn.Module, description: tuple) -> int:
        """``block``'s kind among these blocks, on inputs ``description`` says (a tuple of
        ``fake_graphs.describe``'s: its tensors, positional and keyword arguments)."""
        if description not in self._found:
            self._found[description] = self._check(description)
        return next(k for b, k in zip(self.blocks, self._found[description]) if b is block)

    def _check(self, description: tuple) -> tuple[int, ...]:
        name = type(self.blocks[0]).__mro__[2].__name__
        read = ", ".join(n if not p else f"{p}.{n}" for p, n in self.numbering)
        if any(d is None for d in description):
            codes = list(range(len(self.blocks)))
            why = "takes an argument fxtrain cannot stand in for, so it is not checked"
        else:
            try:
                codes = [fake_graphs.graph_code(functools.partial(_forward, b), description)
                         for b in self.blocks]
            except Exception as error:  # noqa: BLE001 (any failure: in doubt, split)
                codes = list(range(len(self.blocks)))
                why = f"could not be checked ({type(error).__name__}: {error})"
            else:
                why = "is read by their forward"
        order = list(dict.fromkeys(codes))
        if len(order) > 1:
            warnings.warn(f"fx.regional: the {len(self.blocks)} {name} blocks differ in "
                          f"{read}, which {why}: traced as {len(order)} kinds, each compiled "
                          "once", stacklevel=2)
        return tuple(order.index(c) for c in codes)


def _forward(block: nn.Module, tensors: dict, args: tuple, kwargs: dict) -> Any:
    return torch.func.functional_call(block, tensors, args, kwargs)


@run_while_tracing
def _checked_kind(block: nn.Module, description: tuple) -> int:
    """``block``'s kind among the blocks it might share a trace with (``_Alike``), a constant
    of the step's trace."""
    return block._fx_alike.kind(block, description)  # noqa: SLF001


def block_forward(module: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
    """``forward(*args, **kwargs)``, as a region where a compiled step on autograd's path runs
    it (the step's keyed stream continued inside it), else as it is."""
    outer = innermost_mode(random.keyed)
    if outer is None or outer.in_region or outer.autodiff != "autograd" or \
            not torch.compiler.is_compiling():
        return forward(*args, **kwargs)
    keep_region_outputs()
    name = type(module).__qualname__
    paths = getattr(module, "_fx_tensor_paths", None) or regions.tensor_paths(module)
    tensors, position = regions.region_inputs(module, paths), outer.position()
    kind = 0
    if getattr(module, "_fx_alike", None) is not None and regions.REUSES:
        kind = _checked_kind(module, (fake_graphs.describe(tensors), fake_graphs.describe(args),
                                      fake_graphs.describe(kwargs)))
        name = f"{name}#{kind}"
    flat = _flat_arguments(args, kwargs)
    if flat is None:  # an argument neither a tensor nor a plain value: the pytree path
        out = _region(module, name, tensors, outer.key, position, args, kwargs)
    else:
        layout = (name, tuple(tensors), flat[0])  # constants: the region's trace reads them
        out = _flat_region(module, layout, outer.key, position, *tensors.values(), *flat[1])
    outer.advance(module._fx_draws.count(name))  # noqa: SLF001
    return out


_VALUES = (type(None), bool, int, float, str)


def _flat_arguments(args: tuple, kwargs: dict) -> tuple[tuple, list] | None:
    """The block's arguments flat: ``((name or None, is a tensor, value), ...)`` (a constant)
    and their tensors in order; None where one is neither a tensor nor a plain value. A
    region called with its tensors flat spares Dynamo a pytree walk of them per layer
    (``build_input_fingerprint``'s fast path) and its key the same walk (``_flat_key``)."""
    layout, tensors = [], []
    for name, value in [*((None, a) for a in args), *kwargs.items()]:
        if isinstance(value, torch.Tensor):
            layout.append((name, True, None))
            tensors.append(value)
        elif isinstance(value, _VALUES):
            layout.append((name, False, value))
        else:
            return None
    return tuple(layout), tensors


def _region_key(module: nn.Module, name: str, tensors: dict, key: torch.Tensor,
                position: torch.Tensor, args: tuple, kwargs: dict) -> int:
    """The region's reuse key (traced by Dynamo): the block's class and kind (``name``:
    ``_kinds``, ``_Alike``) and the signature of its tensors and arguments."""
    return regions.key_of((type(module).__module__, name, regions.signature(tensors),
                           regions.signature((key, position, args, kwargs))))


@functools.partial(regions.nested, key=_region_key)
def _region(module: nn.Module, name: str, tensors: dict, key: torch.Tensor,
            position: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    return _run(module, name, tensors, key, position, args, kwargs)


def _flat_key(module: nn.Module, layout: int, *flat: torch.Tensor) -> int:
    """``_flat_region``'s reuse key (traced by Dynamo): the block's class, its kind, the names
    and layout of its arguments (``layout``), its tensors' signatures."""
    return regions.flat_key((type(module).__module__, layout), flat)


@functools.partial(regions.nested, key=_flat_key)
def _flat_region(module: nn.Module, layout: int, key: torch.Tensor, position: torch.Tensor,
                 *flat: torch.Tensor) -> Any:
    """``_region`` with its tensors flat: the block's own (under the names of ``layout``),
    then its arguments' (``_flat_arguments``)."""
    kind, names, arguments = layout
    tensors = dict(zip(names, flat))
    rest = iter(flat[len(names):])
    args, kwargs = [], {}
    for name, is_tensor, value in arguments:
        value = next(rest) if is_tensor else value
        if name is None:
            args.append(value)
        else:
            kwargs[name] = value
    return _run(module, kind, tensors, key, position, tuple(args), kwargs)


def _run(module: nn.Module, name: str, tensors: dict, key: torch.Tensor,
         position: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    inner = random.continued(key, position, autodiff="autograd")
    with inner:
        out = torch.func.functional_call(module, tensors, args, kwargs)
    module._fx_draws.note(name, inner.calls)  # noqa: SLF001
    return out


def _auto(module: nn.Module) -> list[str]:
    """transformers' ``_no_split_modules`` (its blocks), else every child of every
    ``nn.ModuleList`` of two or more children of one class."""
    kinds = set(getattr(module, "_no_split_modules", None) or ())
    found = [n for n, m in module.named_modules() if n and type(m).__name__ in kinds]
    if not found:
        found = [f"{n}.{i}" if n else str(i) for n, m in module.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) > 1
                 and len({type(c) for c in m}) == 1 for i in range(len(m))]
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def resolve(module: nn.Module, blocks: str | Sequence[str | type]) -> list[str]:
    """The qualified names of the submodules ``blocks`` names: ``"auto"``, or qualified names
    and module classes (each class: its outermost instances)."""
    if blocks == "auto":
        found = _auto(module)
        if not found:
            raise ValueError(f"fx.regional(blocks='auto'): {type(module).__name__} has no "
                             "nn.ModuleList of one class and no _no_split_modules to take "
                             "blocks from; name them: blocks=['layers.0', ...] or "
                             "blocks=[BlockClass]")
        return found
    if isinstance(blocks, str):
        raise ValueError(f"fx.regional: blocks must be 'auto' or a list of submodule names or "
                         f"module classes, got {blocks!r}")
    modules, found = dict(module.named_modules()), []
    if not blocks:
        raise ValueError(f"fx.regional: blocks={blocks!r} names no block, so nothing would be "
                         "compiled once; name them (blocks=['layers.0', ...] or "
                         "blocks=[BlockClass]), or leave blocks='auto'")
    for block in blocks:
        if isinstance(block, type):
            of_class = [n for n, m in modules.items() if n and isinstance(m, block)]
            if not of_class:
                raise ValueError(f"fx.regional: {type(module).__name__} has no submodule of "
                                 f"class {block.__name__}")
            found += of_class
        elif isinstance(block, str) and block and block in modules:
            found.append(block)
        else:
            raise ValueError(f"fx.regional: {block!r} is not a submodule of "
                             f"{type(module).__name__} nor a module class")
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def _check_buffers_kept(name: str, block: nn.Module) -> None:
    """Refuses a block that writes into its buffers in training (a norm that keeps running
    statistics: BatchNorm, InstanceNorm with ``track_running_stats``): torch's regions take no
    in-place write into their inputs in a training step (``invoke_subgraph``)."""
    for path, sub in block.named_modules():
        if getattr(sub, "track_running_stats", False) and getattr(sub, "running_mean", None) \
                is not None:
            where = f"{name}.{path}" if path else name
            raise ValueError(
                f"fx.regional: {where!r} is a {type(sub).__name__}, whose forward writes its "
                "running statistics (buffers) in training, and torch's regions take no write "
                "into their inputs: leave its blocks out (blocks=[...] naming the others), or "
                "use a norm without running statistics (LayerNorm, GroupNorm, RMSNorm)")


def regional(state: Any, blocks: str | Sequence[str | type] = "auto") -> Any:
    """``state`` whose blocks a compiled step traces and compiles once, for every layer (see
    the module): its first step's compile time stays nearly flat in the model's depth.

    Args:
      state: a ``TrainState`` (not sharded per block: ``fx.shard``'s units are regions of
        their own kind).
      blocks: ``"auto"`` (transformers' ``_no_split_modules``, else the children of each
        ``nn.ModuleList`` of one class), or qualified submodule names and module classes.

    Returns the state with a skeleton whose blocks run as regions in a compiled step on
    autograd's path (``make_train_step``'s ``autodiff="auto"`` takes it for this state); its
    ``layout`` names them (``regions``).

    Examples:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        ...     def forward(self, x):
        ...         for block in self.blocks:
        ...             x = torch.relu(block(x))
        ...         return x
        >>> state = fx.regional(fx.TrainState.create(Net(), fx.optim.sgd(0.1)))
        >>> state.layout.regions
        ('blocks.0', 'blocks.1', 'blocks.2')
        >>> type(state.module.blocks[0]).__name__
        'RegionalLinear'
    """
    layout = state.layout
    if layout.units or layout.regions:
        raise ValueError("fx.regional: this state's blocks are already "
                         + ("regions" if layout.regions else "per-block units (fx.shard)"))
    found = resolve(state.module, blocks)
    module = copy.deepcopy(state.module)  # a skeleton: no tensors to copy
    blocks = [module.get_submodule(name) for name in found]
    for name, block in zip(found, blocks):
        _check_buffers_kept(name, block)
    draws = regions.draw_table()  # each kind's keyed draws, noted where its region is traced
    for cls in dict.fromkeys(type(b) for b in blocks):
        alike = [b for b in blocks if type(b) is cls]
        kinds, numbering = _kinds(alike)
        for block, kind in zip(alike, kinds):
            block.__class__ = _regional_class(cls, kind)
            block._fx_tensor_paths = regions.tensor_paths(block)  # noqa: SLF001
            block._fx_alike = None  # noqa: SLF001
            block._fx_draws = draws  # noqa: SLF001
        for kind in set(kinds) if numbering else ():
            of_kind = [b for b, k in zip(alike, kinds) if k == kind]
            checked = _Alike(of_kind, numbering) if len(of_kind) > 1 else None
            for block in of_kind:
                block._fx_alike = checked  # noqa: SLF001
    state = state.replace(module=module, layout=layout.replace(
        regions=tuple(found), skeleton=layout.skeleton or state.module))
    return state.replace(layout=state.layout.replace(block_update=_region_update.built(state)))
