"""The optimizer abstraction: a pair of pure functions, and their composition.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; the new
parameters are ``params + updates`` (see ``apply_updates``). A transform without state uses
``None`` as its state (never an empty container: Dynamo mis-traces those next to 0-d tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

__all__ = [
    "GradientTransformation", "chain", "identity", "apply_updates", "global_norm", "tree_map",
    "tree_zeros_like", "tree_select", "first_leaf", "squared_norms", "Schedule", "ScalarOrSchedule",
]

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | torch.Tensor | Schedule


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params | None], tuple[Updates, OptState]]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``fn`` over the tensor leaves of ``tree`` (and the matching leaves of ``rest``).

    Other leaves (``None`` marks an absent state) pass through from ``tree`` unchanged. A flat
    dict of tensors (the parameter layout) takes a direct path: fewer guards when compiled.
    """
    if type(tree) is dict and all(type(r) is dict and r.keys() == tree.keys() for r in rest):
        return {k: _apply(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    return pytree.tree_map(lambda x, *xs: fn(x, *xs) if isinstance(x, torch.Tensor) else x,
                           tree, *rest)


def _apply(fn: Callable, x: Any, *xs: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x, *xs)
    return tree_map(fn, x, *xs)


def tree_zeros_like(tree: Any) -> Any:
    return tree_map(torch.zeros_like, tree)


def tree_select(pred: torch.Tensor, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``torch.where(pred, a, b)``: a branch-free choice between two trees (a leaf
    that is the same tensor in both is kept as it is)."""
    return tree_map(lambda a, b: a if a is b else torch.where(pred, a, b), on_true, on_false)


def first_leaf(tree: Any) -> torch.Tensor:
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        raise ValueError("the parameter tree has no tensors")
    return leaves[0]


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


def global_norm(tree: Any) -> torch.Tensor:
    """sqrt(sum of squares of every leaf), accumulated in float32 or wider."""
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        raise ValueError("global_norm of an empty tree")
    return torch.sqrt(sum(squared_norms(leaves)))


def squared_norms(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each leaf's sum of squares in float32 or wider (plain reductions that Inductor fuses)."""
    return [leaf.to(torch.promote_types(leaf.dtype, torch.float32)).square().sum() for leaf in leaves]
