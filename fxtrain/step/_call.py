"""How ``fx.fit`` calls a train step: without the host values a compiled step must not see
(the data position, the host callbacks' states), with the donation fit asks for, past Dynamo's
guards once that is safe, with fxtrain's own error first; and how it undoes a step that a host
callback skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._torch import traced_errors as _traced_errors
from ._unguarded import Unguarded
from ._steps import revert_update
from ._spec import StepSpec


def step_call(train_step: Callable, spec: StepSpec, host_names: frozenset,
              donates: bool) -> Callable:
    """Calls the step without the data position and the host callbacks' states, asking steps
    built with ``donate=None`` to donate when ``donates``; a compiled step skips Dynamo's
    guards once that is safe (see ``fxtrain.step._unguarded``).

    The data position and host states are host values (Python numbers, loader state): keeping
    them out of the compiled step keeps its inputs' structure fixed, so it never recompiles
    because of them.
    """

    step = Unguarded(train_step)
    kwargs = {"donate": donates} if spec.takes_donate else {}  # the same on every call

    def call(state, batch):
        try:
            return step(state, batch, **kwargs)
        except Exception as e:  # fxtrain's (or the model's) error first, not the compiler's
            _traced_errors.reraise(e, "the train step")

    def run(state, batch, position):
        states = state.callbacks or {}
        if host_names.isdisjoint(states):
            new, metrics = call(state.replace(data=None), batch)
            return new.replace(data=position), metrics
        if host_names.issuperset(states):  # host states only: the step sees none
            new, metrics = call(state.replace(data=None, callbacks=None), batch)
            return new.replace(data=position, callbacks=states), metrics
        host = {k: states[k] for k in host_names if k in states}
        inner = {k: v for k, v in states.items() if k not in host} or None
        new, metrics = call(state.replace(data=None, callbacks=inner), batch)
        stepped = new.callbacks or {}  # back in the state's order, so its structure is stable
        callbacks = {k: host[k] if k in host else stepped[k] for k in states}
        return new.replace(data=position, callbacks=callbacks), metrics

    return run


def undo(before: Any, state: Any, skip: Any, donated: bool, step: int) -> Any:
    """``state`` with the update of the step just taken undone where ``skip`` holds."""
    if skip is False:
        return state
    if donated:
        raise ValueError(
            f"fit: a host callback asked to skip step {step}, but fit donated that step's state "
            "(its old values are gone); make it a Callback with skips=True (fit then keeps "
            "each step's old state), or run it inside the step: make_train_step(..., "
            "callbacks=[...])")
    return revert_update(before, state, skip)
