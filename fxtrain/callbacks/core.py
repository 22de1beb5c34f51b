"""The callback protocol: events, controls, and the fold.

A callback is a function ``(state, event) -> (state, control)``. A stateful callback is a
``Callback`` value: a ``name`` (its key in ``state.callbacks``), an ``init(state)`` giving its
initial state, and the function. The loop folds callbacks left to right after each event and
merges their controls with ``|``. Controls hold Python bools on the host and 0-d bool tensors
inside a compiled step; ``|`` works for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import struct

__all__ = ["EVENT_KINDS", "Event", "Control", "Callback", "fold", "init_states", "callback_state"]

EVENT_KINDS = ("train_begin", "step_end", "eval_end", "epoch_end", "checkpoint", "train_end")


@struct.dataclass
class Event:
    """Something that happened in the loop; ``metrics`` is a dict of 0-d tensors or numbers."""

    kind: str = struct.field(static=True)
    step: Any = 0
    epoch: Any = 0
    metrics: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {EVENT_KINDS}")


@struct.dataclass
class Control:
    """What callbacks ask the loop to do. ``a | b`` asks for everything either asks for."""

    stop: Any = False
    save: Any = False
    evaluate: Any = False
    log: Any = False

    def __or__(self, other: Control) -> Control:
        if not isinstance(other, Control):
            return NotImplemented
        return Control(*(a | b for a, b in zip(_flags(self), _flags(other))))


def _flags(c: Control) -> tuple:
    return c.stop, c.save, c.evaluate, c.log


@dataclasses.dataclass(frozen=True)
class Callback:
    """A named, stateful callback: ``fn(state, event) -> (state, control)``, state from ``init``."""

    name: str
    init: Callable[[Any], Any]
    fn: Callable[[Any, Event], tuple[Any, Control]]

    def __call__(self, state, event):
        return self.fn(state, event)


def callback_state(state: Any, name: str) -> Any:
    """The state of the callback called ``name``."""
    return state.callbacks[name]


def init_states(callbacks: Sequence[Callable], state: Any) -> dict[str, Any] | None:
    """``{name: init(state)}`` for the stateful callbacks; duplicate names are an error."""
    states: dict[str, Any] = {}
    for cb in callbacks:
        if isinstance(cb, Callback):
            if cb.name in states:
                raise ValueError(
                    f"two callbacks are named {cb.name!r}; names are checkpoint keys, so give "
                    "the second one an explicit name=...")
            states[cb.name] = cb.init(state)
    return states or None


def _check_result(cb: Callable, result: Any) -> tuple[Any, Control]:
    ok = isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Control)
    if not ok:
        name = getattr(cb, "name", getattr(cb, "__qualname__", repr(cb)))
        raise TypeError(f"callback {name} returned {type(result).__name__}; a callback must "
                        "return (state, fx.Control(...))")
    return result


def fold(callbacks: Sequence[Callable], state: Any, event: Event) -> tuple[Any, Control]:
    """Runs ``callbacks`` left to right on ``event``; each sees the state the previous left."""
    control = Control()
    for cb in callbacks:
        state, c = _check_result(cb, cb(state, event))
        control = control | c
    return state, control

