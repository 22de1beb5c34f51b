"""Combinators: when a callback runs. Periodicity is a predicate, separate from the action.

``every(n, cb)`` and ``on_steps(steps, cb)`` work on the host (Python step numbers) and inside
a compiled step (tensor step numbers: the callback always runs and its result is kept with
``torch.where``, so there is no branch and no sync). ``every_secs`` reads the clock, so it runs
on the host only; its clock is injectable for deterministic tests.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import distributed
from ..tree import tree_select
from .core import (DEFAULT_KINDS, EVENT_KINDS, FLAGS, NOTHING, Callback, Control, Event, fold,
                   name_of)


def as_callback(cb: Callable) -> Callback:
    """``cb`` as a ``Callback`` (a plain function becomes a stateless one named after it).

    Examples:
        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> cb = fx.callbacks.as_callback(show)
        >>> cb.name, cb.init, cb.host, cb.kinds == fx.callbacks.DEFAULT_KINDS
        ('show', None, False, True)
        >>> fx.callbacks.as_callback(cb) is cb
        True
    """
    if isinstance(cb, Callback):
        return cb
    if not callable(cb):
        raise TypeError(f"a callback must be callable (state, event) -> (state, control); got "
                        f"{type(cb).__name__}")
    return Callback(name=name_of(cb), init=None, fn=cb)


def _check_structure(new: Any, old: Any, who: str) -> None:
    if pytree.tree_structure(new) != pytree.tree_structure(old):
        raise ValueError(f"callback {who} changed the structure of the state; under a periodic "
                         "combinator inside a step it must keep it")


def _where_due(flag: Any, now: torch.Tensor) -> Any:
    """A flag of a callback run inside a step, kept only where it was ``now`` due."""
    return flag & now if isinstance(flag, torch.Tensor) or flag else False


def _gated(inner: Callback, due: Callable[[Event], Any]) -> Callable:
    """Runs ``inner`` on step_end events that are ``due`` (a bool, or a 0-d bool tensor)."""

    def fn(state, event):
        if event.kind != "step_end":
            return fold((inner,), state, event)
        now = due(event)
        if isinstance(now, torch.Tensor):  # inside a step: run it, keep its result where due
            new, control = fold((inner,), state, event)
            _check_structure(new, state, name_of(inner))
            return tree_select(now, new, state), Control(**{
                name: _where_due(getattr(control, name), now) for name in FLAGS})
        return fold((inner,), state, event) if now else (state, NOTHING)

    return fn


def _steps_only(cb: Callback) -> Callback:
    """``cb`` reacting to step_end only, unless it named its kinds (a function written for a
    step's metrics would fail on train_begin, which has none)."""
    return dataclasses.replace(cb, kinds=("step_end",)) if cb.kinds == DEFAULT_KINDS else cb


def periodic(n: int, who: str, arg: str = "every") -> Callable[[Any], Any]:
    """The predicate "``step`` is a multiple of ``n``" (a bool, or a 0-d bool tensor for a tensor
    step), after checking that ``n`` is a positive int; ``who`` and ``arg`` name it in the error.
    ``every`` gates callbacks with it; callbacks that act on every step but write periodically
    (``log_metrics``) test it themselves."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{who}: {arg} must be a positive int, got {n!r}")
    return lambda step: step % n == 0


def every(n: int, cb: Callable) -> Callback:
    """Runs ``cb`` on step_end events at steps that are multiples of ``n``.

    A plain function (or a ``Callback`` that names no kinds) sees only those step_end events;
    a ``Callback`` that names its kinds also gets the other kinds it names, unchanged (a
    monitor that starts its clock at ``train_begin``). The wrapped callback keeps ``cb``'s name
    and state, so wrapping does not change checkpoints. On the host the fold skips it between due
    steps without calling it (``Callback.period``); inside a step it runs every step and its
    result is kept only on due steps.

    Examples:
        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=6,
        ...                callbacks=[fx.callbacks.every(2, show)])
        step_end 2
        step_end 4
        step_end 6
    """
    due = periodic(n, "every", "n")
    inner = _steps_only(as_callback(cb))
    if n == 1:
        return inner
    return dataclasses.replace(inner, fn=_gated(inner, lambda e: due(e.step)),
                               period=math.lcm(n, inner.period))


def on_steps(steps: Collection[int], cb: Callable) -> Callback:
    """Runs ``cb`` on step_end events at the given steps (other kinds as ``every`` passes them).

    Examples:
        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> cb = fx.callbacks.on_steps([1, 10], show)
        >>> for step in range(1, 12):
        ...     _ = fx.callbacks.fold([cb], None, fx.Event("step_end", step))
        step_end 1
        step_end 10
        >>> _ = fx.callbacks.fold([cb], None, fx.Event("train_end", 11))  # not a step: not shown
    """
    wanted = sorted({int(s) for s in steps})
    inner = _steps_only(as_callback(cb))

    def due(event):
        if isinstance(event.step, torch.Tensor):
            return (event.step == torch.tensor(wanted, device=event.step.device)).any()
        return event.step in wanted

    return dataclasses.replace(inner, fn=_gated(inner, due))


def every_secs(seconds: float, cb: Callable, *,
               time_fn: Callable[[], float] = time.monotonic) -> Callback:
    """Runs ``cb`` on a step_end at most once per ``seconds`` of ``time_fn`` (host only).

    The first run is ``seconds`` after the first event it sees. Events of other kinds reach
    it as under ``every``: a plain function sees only the due step_end events.

    Examples:
        With a fake clock, steps of 25 s, and a report at most once a minute:

        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> now = [0.0]
        >>> cb = fx.callbacks.every_secs(60, show, time_fn=lambda: now[0])
        >>> for step in range(1, 8):
        ...     now[0] += 25.0
        ...     _ = fx.callbacks.fold([cb], None, fx.Event("step_end", step))
        step_end 4
        step_end 7
    """
    if seconds <= 0:
        raise ValueError(f"every_secs: seconds must be > 0, got {seconds}")
    inner = _steps_only(as_callback(cb))
    last: list[float] = []  # the time of the last run; host-only, not part of the state

    def due(event):
        now = time_fn()
        if now - last[0] >= seconds:
            last[0] = now
            return True
        return False

    gated = _gated(inner, due)

    def fn(state, event):
        if not last:
            last.append(time_fn())
        return gated(state, event)

    return dataclasses.replace(inner, fn=fn, host=True)


def on(kind: str, cb: Callable) -> Callback:
    """Runs ``cb`` only on events of ``kind``.

    Examples:
        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> cb = fx.callbacks.on("eval_end", show)
        >>> cb.kinds
        ('eval_end',)
        >>> for kind in ("step_end", "eval_end", "train_end"):
        ...     _ = fx.callbacks.fold([cb], None, fx.Event(kind, 5))
        eval_end 5
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"on: unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
    if not isinstance(cb, Callback):  # a plain function: any kind, step_begin included
        return dataclasses.replace(as_callback(cb), kinds=(kind,))
    return dataclasses.replace(cb, kinds=tuple(k for k in cb.kinds if k == kind))


def rank_zero(cb: Callable) -> Callback:
    """Runs ``cb`` on rank 0 only (every process when torch.distributed is not initialized).

    The rank is looked up at each train_begin (and at the first event, outside ``fit``), not
    per event: a logging callback called every step pays one comparison for it.

    Examples:
        >>> def show(state, event):
        ...     print(event.kind, event.step)
        >>> cb = fx.callbacks.rank_zero(show)
        >>> _ = fx.callbacks.fold([cb], None, fx.Event("step_end", 3))  # elsewhere: nothing
        step_end 3
    """
    inner = as_callback(cb)
    inner_fn, inner_kinds = inner.fn, inner.kinds
    on_rank_zero: list[bool] = []

    def fn(state, event):
        if event.kind == "train_begin" or not on_rank_zero:
            on_rank_zero[:] = [distributed.is_rank_zero()]
        if not on_rank_zero[0] or event.kind not in inner_kinds:
            return state, NOTHING
        return inner_fn(state, event)

    kinds = inner.kinds if "train_begin" in inner.kinds else ("train_begin", *inner.kinds)
    return dataclasses.replace(inner, fn=fn, kinds=kinds)


def lambda_callback(*, name: str = "lambda_callback", **hooks: Callable) -> Callback:
    """A stateless callback from one function per event kind: ``on_step_end=f`` and so on.

    Each hook is ``f(state, event)`` and returns ``(state, control)``, or None to change nothing.

    Examples:
        >>> cb = fx.callbacks.lambda_callback(
        ...     on_train_end=lambda s, e: print("done at", e.step),
        ...     on_eval_end=lambda s, e: (s, fx.Control(stop=e.metrics["loss"] < 0.1)))
        >>> cb.kinds
        ('train_end', 'eval_end')
        >>> fx.callbacks.fold([cb], None, fx.Event("eval_end", 100, metrics={"loss": 0.05}))
        (None, Control(stop=True, save=False, evaluate=False, log=False, skip=False,
                       stop_epoch=False, abort=False))
        >>> _ = fx.callbacks.fold([cb], None, fx.Event("train_end", 100))
        done at 100
    """
    table = {}
    for key, fn in hooks.items():
        kind = key.removeprefix("on_")
        if not key.startswith("on_") or kind not in EVENT_KINDS:
            raise ValueError(f"lambda_callback: unknown hook {key!r}; use on_<kind> with kind in "
                             f"{EVENT_KINDS}")
        table[kind] = fn

    def fn(state, event):
        out = table[event.kind](state, event)
        return (state, NOTHING) if out is None else out

    return Callback(name=name, init=None, fn=fn, kinds=tuple(table))
