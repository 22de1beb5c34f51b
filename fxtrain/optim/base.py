"""The optimizer abstraction: a pair of pure functions, and their composition.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; the new
parameters are ``params + updates`` (see ``apply_updates``). A transform without state uses
``None`` as its state (never an empty container: Dynamo mis-traces those next to 0-d tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..tree import tree_map

__all__ = ["GradientTransformation", "chain", "identity", "apply_updates", "Schedule",
           "ScalarOrSchedule"]

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | torch.Tensor | Schedule


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params | None], tuple[Updates, OptState]]


def identity() -> GradientTransformation:
    """Passes updates through unchanged."""

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of "
                             f"{type(state).__name__}; was it made by another optimizer?")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, keeping each parameter's dtype."""
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)
