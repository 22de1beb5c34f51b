"""``find_nonfinite``'s report (``NonFinite``) and what fills it: the step's inputs and results
by path, the root event behind its non-finite results, a kernel's module and side from the FX
nodes it computes."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

from .._torch import kernel_watch
from ..state import TrainState
from ..tree import leaves_with_paths
from ._taint import Event, Taint, Values, checked, finite, first_root


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Where a train step first made a value that is not finite (``find_nonfinite``'s report).

    Attributes:
      mode: ``"input"`` (the state or batch given already held it), ``"eager"`` (an ATen op of
        the eager step) or ``"compiled"`` (an Inductor kernel of the compiled step).
      op: the ATen op (``"aten.log.default"``) or the kernel (``"cpp_fused_log1p_neg_0"``);
        for ``"input"``, empty.
      module: the path of the innermost module it ran in (``"blocks.1.attention.qkv"``; ``""``
        the model itself), None outside the model (the loss, the update).
      module_type: that module's class name.
      side: ``"forward"``, ``"backward"`` (of an op of ``module``'s forward), ``"update"``
        (after the backward: the optimizer, in-step callbacks) or ``"input"``.
      value: which value: ``"output 0"`` of the op, ``"written tensor 2"`` of a kernel's
        arguments, or the input's path (``"state.params['w']"``).
      values: its nan and inf counts, size, shape and dtype.
      where: the source line (``"model.py:31 in forward"``; for the backward, the forward's).
      detail: more on the op: the autograd node of a backward op, the ATen ops a kernel fuses.
      reaches: the step's results (new parameters, buffers, metrics) it made non-finite.
    """

    mode: str
    op: str
    module: str | None
    module_type: str
    side: str
    value: str
    values: Values
    where: str = ""
    detail: str = ""
    reaches: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.mode == "input":
            lines = [f"input {self.value}: {self.values}"]
        else:
            what = "eager op" if self.mode == "eager" else "compiled kernel"
            module = ("outside the model" if self.module is None else
                      f"in {self.module or 'the model'} ({self.module_type})")
            head = (", ".join((f"{what} {self.op}", self.side, module)) if self.op else
                    f"{self.mode} step: {self.value} is not finite")
            lines = [head, f"  {self.value}: {self.values}"]
        lines += [f"  {line}" for line in (self.detail, f"at {self.where}" if self.where else "")
                  if line]
        if self.reaches:
            more = f" and {len(self.reaches) - 3} more" if len(self.reaches) > 3 else ""
            lines.append(f"  reaches {', '.join(self.reaches[:3])}{more}")
        return "\n".join(lines)


def report(mode: str, event: Event, reaches: tuple[str, ...]) -> NonFinite:
    """The report of a root ``event`` and the results it ``reaches``."""
    return NonFinite(mode=mode, value=event.value, values=event.values, reaches=reaches,
                     **event.facts)


def unexplained(mode: str, path: str, t: torch.Tensor, why: str) -> NonFinite:
    """The report of a non-finite result ``t`` at ``path`` that no watched op or kernel wrote."""
    return NonFinite(mode=mode, op="", module=None, module_type="", side="unknown",
                     value=path, values=Values.of(t), detail=why, reaches=(path,))


def inputs(state: TrainState, batch: Any) -> NonFinite | None:
    """The first non-finite leaf of the state's parameters, buffers and optimizer state, or of
    the batch (the callbacks' states may hold an infinity on purpose: a best metric's start)."""
    given = [(f"state.{field}", getattr(state, field)) for field in ("params", "buffers",
                                                                      "opt_state")]
    given = [(where, leaf) for name, tree in [*given, ("batch", batch)]
             for where, leaf in _paths(name, tree)]
    for path, leaf in given:
        if checked(leaf) and not finite(leaf):
            return NonFinite(mode="input", op="", module=None, module_type="", side="input",
                             value=path, values=Values.of(leaf),
                             detail="the state or batch given holds it already (an earlier "
                             "step, or the data, made it)")
    return None


def results(out: Any) -> list[tuple[str, torch.Tensor]]:
    """The results of a step a NaN must not reach: the new parameters and buffers, and the
    metrics (not the optimizer or callback states, which may hold infinities on purpose)."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], TrainState)
            and isinstance(out[1], dict)):
        raise TypeError(
            f"find_nonfinite: train_step(state, batch) returned {type(out).__name__}, not "
            "(state, metrics); pass the train step (fx.make_train_step's, compiled or not), not "
            "an eval step or a loss function")
    state, metrics = out
    return [*_paths("state.params", state.params), *_paths("state.buffers", state.buffers),
            *_paths("metrics", metrics)]


def _paths(name: str, tree: Any) -> list[tuple[str, Any]]:
    """``tree``'s leaves with their paths under ``name`` (``state.params['w']``, ``batch``)."""
    return [(name + ("" if p == "<root>" else p), leaf) for p, leaf in leaves_with_paths(tree)]


def found(mode: str, taint: Taint, outs: list[tuple[str, torch.Tensor]]) -> NonFinite | None:
    """The report of a run whose ``taint`` was recorded and whose results are ``outs``."""
    first, reaches, unseen = first_root(taint, outs)
    if first is not None:
        return report(mode, first, reaches)
    if unseen:
        path = unseen[0]
        value = dict(outs)[path]
        why = ("no op watched wrote it non-finite" if mode == "eager" else
               "no watched kernel wrote it non-finite (an op Inductor ran outside its kernels)")
        return unexplained(mode, path, value, why)
    return None


# ATen ops that can make a nan or an infinity out of finite values: at a pole or a domain's
# edge, then by an overflow. Where a kernel fuses such ops, their module is taken as its own.
_RISKY = (frozenset("""log log1p log2 log10 xlogy sqrt rsqrt div reciprocal pow exp exp2 expm1
                       tan acos asin acosh atanh lgamma digamma polygamma erfinv fmod remainder
                       atan2""".split()),
          frozenset("mm addmm bmm baddbmm sum mean var std var_mean prod cumsum cumprod "
                    "logsumexp".split()))


def kernel_facts(kernel: kernel_watch.Kernel) -> dict[str, Any]:
    """The op fields of a kernel's report, from the FX nodes it computes (best effort: a fused
    kernel spans ops of several modules; those of its ops that can make non-finite values out
    of finite ones, then the most of its ops, then the innermost, choose)."""
    origins = kernel.origins()
    sides = {o.side for o in origins}
    side = next((s for s in ("backward", "forward", "update") if s in sides), "unknown")
    mine = [o for o in origins if o.side == side]
    tiers = ([o for o in mine if o.op.split(".")[1:2] and o.op.split(".")[1] in ops]
             for ops in _RISKY)
    mine = next((risky for risky in tiers if risky), mine)
    counts = collections.Counter(o.module for o in mine if o.module is not None)
    module = max(counts, key=lambda m: (counts[m], m.count(".") + bool(m)), default=None)
    module_type = next((o.module_type for o in mine if o.module == module), "")
    where = next((o.where for o in mine if o.where and o.module == module), "")
    ops = list(dict.fromkeys(o.op.rsplit(".", 1)[0] for o in origins))
    detail = (f"fuses {', '.join(ops)}" if ops else
              "its FX nodes are not known on this torch (Inductor's provenance)")
    return dict(op=kernel.name, module=module, module_type=module_type, side=side, where=where,
                detail=detail)
