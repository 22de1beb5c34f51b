"""``find_nonfinite``: the first operation of one train step whose output is not finite, found
by running the step again (same state, same batch, so the same random keys) eagerly op by op,
and compiled by Inductor kernel by kernel (``fxtrain.debug._watch``, ``fxtrain._torch.op_watch``
and ``kernel_watch``); ``fxtrain.debug._taint`` follows the values back to where they began.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import donation
from .._torch import dynamo, kernel_watch, op_watch
from ..state import TrainState
from ..step import step_spec
from ._report import NonFinite, found, inputs, kernel_facts, results
from ._taint import Taint
from ._watch import EagerWatch


def _run(step: Callable, state: TrainState, batch: Any, mode: str) -> Any:
    try:
        return step(state, batch)
    except Exception as e:
        if mode == "compiled":
            raise RuntimeError(
                f"find_nonfinite: the compiled check could not compile or run the step with "
                f"Inductor: {type(e).__name__}: {e} (compiled=False skips that check)") from e
        raise RuntimeError(
            f"find_nonfinite: the train step failed on this state and batch, before any value "
            f"was judged: {type(e).__name__}: {e}. Pass the step, a state and a batch it takes, "
            "as in train_step(state, batch)") from e


def _eager(step: Callable, state: TrainState, batch: Any) -> NonFinite | None:
    watch = EagerWatch(state.module)
    with watch:
        out = _run(step, state, batch, "eager")
    return found("eager", watch.taint, results(out))


def _compiled(step: Callable, state: TrainState, batch: Any) -> NonFinite | None:
    taint = Taint()

    def on_kernel(kernel, read, written):
        taint.record(read, written, lambda: kernel_facts(kernel),
                     [f"written tensor {i}" for i in range(len(written))])

    with kernel_watch.settings_kept(), kernel_watch.KernelWatch(on_kernel) as watch:
        out = _run(watch.compile(step), state, batch, "compiled")
    report = found("compiled", taint, results(out))
    if report is not None and not watch.watched:
        report = dataclasses.replace(report, detail=report.detail + " (its kernels could not "
                                     "be watched on this torch)")
    return report


def _not_donating(train_step: Callable, state: TrainState) -> tuple[Callable, TrainState]:
    """The uncompiled step, and a state it may take: a copy where the step always donates
    (``donate=True``; ``donate=None`` donates only when its caller asks, which we do not)."""
    step = op_watch.uncompiled(train_step)
    if step_spec(train_step).donate:
        copies = {f: pytree.tree_map_only(torch.Tensor, torch.clone, getattr(state, f))
                  for f in donation.DONATED_FIELDS}
        state = state.replace(**copies)
    return step, state


def _check(train_step: Any, state: Any) -> None:
    if not callable(train_step):
        raise TypeError(f"find_nonfinite: train_step must be the step, a function "
                        f"(state, batch) -> (state, metrics), got {type(train_step).__name__}")
    if not isinstance(state, TrainState):
        raise TypeError(f"find_nonfinite: state must be a TrainState, got "
                        f"{type(state).__name__} (call it as find_nonfinite(train_step, state, "
                        "batch))")
    donation.check_live(state, "find_nonfinite")


def find_nonfinite(train_step: Callable, state: TrainState, batch: Any, *, eager: bool = True,
                   compiled: bool | None = None) -> NonFinite | None:
    """Runs one train step again and names the first operation whose output is not finite.

    As JAX's ``jax_debug_nans`` and torch's anomaly mode do, it reruns the step on the same
    state and batch, which replays the same random keys (the step is pure), without donating
    the state, and follows the non-finite values that reach the step's results (its new
    parameters and buffers, its metrics) back to where they began:

    - eagerly, op by op: the first ATen op that made non-finite values out of finite ones, the
      path of the module it ran in (``blocks.1.attention.qkv``), its side (the forward, the
      backward of that module's ops, or the update), its source line, and which output held
      how many nan and inf values. Both gradient paths (``autodiff="func"`` and
      ``"autograd"``) show their modules. A ``torch.compile``-d step runs as the function it
      compiled.
    - compiled (when the eager run is finite): the step compiled again, afresh, with Inductor
      (``fullgraph=True``, Inductor's default options), each kernel call checked: the first
      kernel that wrote non-finite values out of finite ones, and the module, side and source
      line of the FX nodes it computes (best effort: a backward kernel's module is the one of
      the forward values it reads). This finds what only the compiled kernels make.

    Values that go non-finite but reach no result (an attention mask's ``-inf``, an infinite
    gradient a ``where`` drops) are not reported, and a NaN is followed back through the inputs
    that hold a NaN (not through a mask's ``-inf`` it meets). The state, torch's random generators and its
    settings are left as they were (the compiled check turns off Inductor's and AOTAutograd's
    caches for its one compile, and puts them back).

    Args:
      train_step: the train step, as ``fx.make_train_step`` built it, compiled or not.
      state: the state of that call (a ``TrainState``; a donated one is refused).
      batch: the batch of that call.
      eager: run the eager check.
      compiled: run the compiled check when the eager one finds nothing (None: when
        ``train_step`` is ``torch.compile``'s, or ``eager`` is False).

    Returns:
      A ``NonFinite`` (``print`` it), or None when every result is finite in each check run.
      The state or batch holding a non-finite value is reported as ``mode="input"``.

    Examples:
        A log of a negative input, in a submodule's forward:

        >>> class Log(nn.Module):
        ...     def forward(self, x):
        ...         return torch.log(x)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.features, self.head = Log(), nn.Linear(2, 1)
        ...     def forward(self, x):
        ...         return self.head(self.features(x))
        >>> state = fx.TrainState.create(Net(), fx.optim.sgd(0.1))
        >>> def loss_fn(state, params, batch):
        ...     return state.apply(params, batch).square().mean()
        >>> step = fx.make_train_step(loss_fn)
        >>> report = fx.debug.find_nonfinite(step, state, torch.tensor([[1.0, -1.0]]))
        >>> report.op, report.module, report.side
        ('aten.log.default', 'features', 'forward')
        >>> print(report)
        eager op aten.log.default, forward, in features (Log)
          output 0: 1 nan of 2 (shape (1, 2), torch.float32)
          at <doctest ...>:3 in forward
          reaches state.params['head.weight'], state.params['head.bias'], metrics['loss']
          and 1 more
        >>> fx.debug.find_nonfinite(step, state, torch.tensor([[1.0, 2.0]])) is None
        True
    """
    _check(train_step, state)
    step, state = _not_donating(train_step, state)
    if compiled is None:
        compiled = dynamo.is_compiled(train_step) or not eager
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        report = inputs(state, batch)
        if report is None and eager:
            report = _eager(step, state, batch)
        if report is None and compiled:
            report = _compiled(step, state, batch)
    return report
