"""``make_train_step``'s arguments, checked all at once before anything is built.

``step_args(loss_fn, ...)`` refuses a bad argument with a message that names it and the fix,
and otherwise returns a frozen ``StepArgs``: what the step is built from, with the defaults
resolved (the precision's policy, the loss scale a ``"16-mixed"`` step owns, gradient
statistics that an in-step callback asks for, data parallelism from the process group). It
changes nothing: a process-wide setting a step needs (``autodiff="autograd"``'s Dynamo
settings) is made by the builder, after every argument has passed.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from .. import distributed
from ._autodiff import AUTODIFFS
from ..precision import LOSS_SCALE, Policy
from ..precision import loss_scale as default_loss_scale
from ..precision import policy as precision_policy
from ..protocol import Callback, StepState, name_of


@dataclasses.dataclass(frozen=True)
class StepArgs:
    """A train step's checked arguments (see ``make_train_step`` for each).

    Attributes:
      loss_fn: ``loss_fn(state, params, batch)``.
      callbacks: the in-step callbacks, in order.
      step_states: the states the step owns (the loss scale of a ``"16-mixed"`` step).
      mixed: the precision's ``Policy``.
      grad_stats: False, True or ``"histograms"``, an in-step callback's need included.
      data_parallel: what was asked (None: decided by the process group).
      parallel: whether gradients are averaged over ranks (asked for, or several ranks in the
        process group); a step then averages them over the data replicas of the state's
        ``layout`` where it has several (a tensor-parallel group is one).
      buffers: ``"mean"`` or ``"local"``.
      donate: True, False or None (the caller's ``donate=``).
      steps_per_call: K, the steps one call takes.
      precision: the policy's name.
      autodiff: ``"auto"``, ``"func"`` or ``"autograd"``.
    """

    loss_fn: Callable
    callbacks: tuple
    step_states: tuple
    mixed: Policy
    grad_stats: bool | str
    data_parallel: bool | None
    parallel: bool
    buffers: str
    donate: bool | None
    steps_per_call: int
    precision: str
    autodiff: str


def step_args(loss_fn: Any, *, callbacks: Iterable = (), loss_scale: StepState | None = None,
              grad_stats: Any = False, data_parallel: Any = None, buffers: Any = "mean",
              donate: Any = None, steps_per_call: Any = 1, precision: Any = "32",
              autodiff: Any = "auto") -> StepArgs:
    """Checks ``make_train_step``'s arguments and resolves their defaults (no side effect).

    Examples:
        >>> from fxtrain.step._args import step_args
        >>> args = step_args(lambda state, params, batch: 0.0, precision="16-mixed")
        >>> [s.name for s in args.step_states], args.parallel, args.grad_stats
        (['loss_scale'], False, False)
        >>> step_args(lambda state, params, batch: 0.0, steps_per_call=0)
        Traceback (most recent call last):
        ValueError: make_train_step: steps_per_call must be a positive int, got 0
    """
    _check_loss_fn(loss_fn)
    mixed = precision_policy(precision)
    callbacks, owned = _split_step_states(tuple(callbacks), loss_scale)
    _check_step_callbacks(callbacks)
    owned = _with_loss_scale(owned, loss_scale, mixed)
    if grad_stats not in (False, True, "histograms"):
        raise ValueError(f"make_train_step: grad_stats must be False, True or 'histograms', got "
                         f"{grad_stats!r}")
    if buffers not in ("mean", "local"):
        raise ValueError(f"make_train_step: buffers must be 'mean' or 'local', got {buffers!r}")
    if data_parallel not in (None, True, False):
        raise ValueError(f"make_train_step: data_parallel must be True, False or None (on when "
                         f"a process group of several ranks is initialized), got "
                         f"{data_parallel!r}")
    if data_parallel and not distributed.initialized():
        raise ValueError("make_train_step(data_parallel=True) needs an initialized process "
                         "group: call fx.distributed.init() (under torchrun) first")
    if donate not in (None, True, False):
        raise ValueError(f"make_train_step: donate must be True, False or None (when the "
                         f"caller passes donate=True, as fx.fit does), got {donate!r}")
    if autodiff not in AUTODIFFS:
        raise ValueError(f"make_train_step: autodiff must be one of "
                         f"{', '.join(map(repr, AUTODIFFS))}, got {autodiff!r}")
    if not isinstance(steps_per_call, int) or isinstance(steps_per_call, bool) or \
            steps_per_call < 1:
        raise ValueError(f"make_train_step: steps_per_call must be a positive int, got "
                         f"{steps_per_call!r}")
    wanted = grad_stats or any(isinstance(cb, Callback) and cb.grad_stats for cb in callbacks)
    parallel = distributed.world_size() > 1 if data_parallel is None else bool(data_parallel)
    return StepArgs(loss_fn=loss_fn, callbacks=callbacks, step_states=owned, mixed=mixed,
                    grad_stats=wanted, data_parallel=data_parallel, parallel=parallel,
                    buffers=buffers, donate=donate, steps_per_call=steps_per_call,
                    precision=mixed.name, autodiff=autodiff)


def _split_step_states(callbacks: tuple, loss_scale: StepState | None) -> tuple[tuple, tuple]:
    """The in-step callbacks, and the states the step owns (``StepState``): the loss scale,
    given by ``loss_scale=`` or, as before that keyword, among the callbacks (the documented
    alias; never both), and any other ``StepState`` passed there."""
    owned = tuple(cb for cb in callbacks if isinstance(cb, StepState))
    callbacks = tuple(cb for cb in callbacks if not isinstance(cb, StepState))
    if loss_scale is not None:
        if not isinstance(loss_scale, StepState) or loss_scale.name != LOSS_SCALE:
            raise TypeError(f"make_train_step: loss_scale must be fx.precision.loss_scale(...), "
                            f"got {loss_scale!r}")
        owned = (loss_scale, *owned)
    scales = sum(s.name == LOSS_SCALE for s in owned)
    if scales > 1:
        where = "loss_scale= and callbacks=" if loss_scale is not None else "callbacks="
        raise ValueError(f"make_train_step: {scales} loss scales were given (in {where}); a "
                         "step has one: pass it as loss_scale=fx.precision.loss_scale(...)")
    return callbacks, owned


def _with_loss_scale(owned: tuple, loss_scale: StepState | None, mixed: Policy) -> tuple:
    """``owned`` with the default loss scale when a ``"16-mixed"`` step was given none. On
    another precision a scale is refused by the keyword; among the callbacks (the alias, which
    such steps accepted before) it is kept, with a warning that it is unused."""
    if not any(s.name == LOSS_SCALE for s in owned):
        return (default_loss_scale(), *owned) if mixed.scaled else owned
    if mixed.scaled:
        return owned
    said = (f"a loss scale is for precision='16-mixed' (float16 needs one); this step's "
            f"precision is {mixed.name!r}, which scales nothing")
    if loss_scale is not None:
        raise ValueError(f"make_train_step: {said}: drop loss_scale=, or use "
                         "precision='16-mixed'")
    warnings.warn(f"make_train_step: {said}, so the loss scale in callbacks= is unused; drop "
                  "it", UserWarning, stacklevel=4)
    return owned


def _check_step_callbacks(callbacks: tuple) -> None:
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"make_train_step: callback {cb!r} is not callable")
        if isinstance(cb, Callback) and cb.host:
            raise ValueError(
                f"callback {name_of(cb)} does IO or reads the clock, so it cannot run inside the "
                "compiled step; pass it to fx.fit(..., callbacks=[...]) instead")
        if isinstance(cb, Callback) and "step_end" not in cb.kinds:
            raise ValueError(
                f"callback {name_of(cb)} reacts to {cb.kinds}, but inside the step there are "
                "only step_end events; run it in fx.fit(..., callbacks=[...]) instead")


def _check_loss_fn(loss_fn: Any) -> None:
    """Refuses a ``loss_fn`` that cannot take (state, params, batch)."""
    if not callable(loss_fn):
        raise TypeError(f"make_train_step: loss_fn must be a function loss_fn(state, params, "
                        f"batch), got {type(loss_fn).__name__}")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # a builtin or an extension: nothing to read
        return
    try:
        signature.bind(None, None, None)
    except TypeError as e:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(
            f"make_train_step: loss_fn must take three arguments, loss_fn(state, params, batch), "
            f"and run the model with state.apply(params, inputs); {name}{signature} cannot be "
            f"called so ({e}). From a JAX-style loss_fn(params, batch) write lambda state, params, "
            f"batch: ...; from a PyTorch one taking (model, batch), call state.apply(params, x) "
            f"where it called model(x)") from None
