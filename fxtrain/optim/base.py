"""The optimizer abstraction: a pair of pure functions, and their composition.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; the new
parameters are ``params + updates`` (see ``apply_updates``). A transform without state uses
``None`` as its state (never an empty container: Dynamo mis-traces those next to 0-d tensors).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..donation import written_into
from ..tree import tree_map

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A learning-rate (or other) schedule: the step count, a 0-d tensor, to a 0-d tensor."""
ScalarOrSchedule = float | torch.Tensor | Schedule


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``.

    Examples:
        A transform of your own is two pure functions; this one keeps the sign of each
        gradient and counts its updates in a tensor:

        >>> def scale_by_sign():
        ...     def init(params):
        ...         del params
        ...         return torch.zeros((), dtype=torch.int64)  # its state: a step count
        ...     def update(grads, count, params=None):
        ...         del params
        ...         return fx.tree.tree_map(torch.sign, grads), count + 1
        ...     return fx.optim.GradientTransformation(init, update)
        >>> tx = scale_by_sign()
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> count = tx.init(params)
        >>> tx.update({"w": torch.tensor([0.3, -4.0])}, count, params)
        ({'w': tensor([ 1., -1.])}, tensor(1))
    """

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params | None], tuple[Updates, OptState]]


class WeightedTransformation(GradientTransformation):
    """A ``GradientTransformation`` whose ``update`` also takes ``weight=``: how much the
    gradient it is given counts against others (the number of tokens it averages over, from
    ``fx.losses.Mean``). ``fx.optim.multi_steps`` is one: it accumulates micro-batches by their
    weights. ``update_weighted`` passes the weight to those that take it."""


_WRITES_INTO: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fxtrain_optim_writes_into", default=None)


@contextlib.contextmanager
def writing_into_state(opt_state: OptState) -> Iterator[None]:
    """Inside, uncompiled: a ``chain`` given ``opt_state`` itself (the optimizer's own, when it
    is a chain) writes each transform's new state into it as soon as the transform has run,
    for a caller that gives that state up (a step that donates it and never reverts it:
    ``fxtrain.donation``). A chain inside another transform is given a part of it and does
    not: that transform may still read its old state. An eager AdamW update then holds Adam's
    new moments in the old ones' storage instead of beside them until it ends: three trees of
    the parameters' size at its peak (the gradients, the direction, the decayed direction)
    rather than five. Compiled, the
    graph writes the donated state in place by itself."""
    token = _WRITES_INTO.set(opt_state)
    try:
        yield
    finally:
        _WRITES_INTO.reset(token)


def writable(state: OptState) -> bool:
    """Whether a transform may write its new ``state`` over the one it was given, in place
    (uncompiled, inside ``writing_into_state``, when ``state`` is one of the states the
    optimizer's own chain gives its transforms): as ``torch.optim`` updates Adam's moments,
    so that the new ones never sit beside the old ones."""
    given = None if torch.compiler.is_compiling() else _WRITES_INTO.get()
    return isinstance(given, tuple) and any(state is s for s in given)


def update_weighted(tx: GradientTransformation, updates: Updates, state: OptState,
                    params: Params | None, weight: torch.Tensor | None
                    ) -> tuple[Updates, OptState]:
    """``tx.update``, with ``weight=`` when ``tx`` takes one (``WeightedTransformation``)
    and a weight is given; a plain transformation is called as always (the weight says how
    gradients compare with each other, and it is given one at a time).

    Examples:
        >>> tx = fx.optim.multi_steps(fx.optim.sgd(1.0), every_k=2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for g, tokens in ((1.0, 1), (4.0, 3)):  # means over 1 token, then over 3
        ...     updates, state = fx.optim.update_weighted(
        ...         tx, {"w": torch.tensor([g])}, state, params, torch.tensor(float(tokens)))
        >>> updates["w"]  # -(1 * 1 + 3 * 4) / 4: every token counts alike
        tensor([-3.2500])
    """
    if weight is not None and isinstance(tx, WeightedTransformation):
        return tx.update(updates, state, params, weight=weight)
    return tx.update(updates, state, params)


def identity() -> GradientTransformation:
    """Passes updates through unchanged.

    Examples:
        >>> tx = fx.optim.identity()
        >>> state = tx.init({"w": torch.zeros(2)})  # None: no state
        >>> tx.update({"w": torch.tensor([3.0, 4.0])}, state)
        ({'w': tensor([3., 4.])}, None)
    """

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states.

    Examples:
        Clip the gradient's global norm to 1, then take a step of -0.5 times it (the
        optimizers in ``fx.optim`` are chains like this one):

        >>> tx = fx.optim.chain(fx.optim.clip_by_global_norm(1.0), fx.optim.scale(-0.5))
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> state  # one state per transform; these two have none
        (None, None)
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, state, params)
        >>> updates  # [3, 4] has norm 5: clipped to [0.6, 0.8], then scaled
        {'w': tensor([-0.3000, -0.4000])}
    """

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, weight=None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of "
                             f"{type(state).__name__}; was it made by another optimizer?")
        writes = not torch.compiler.is_compiling() and _WRITES_INTO.get() is state
        new_state = []
        for t, old in zip(transforms, state):
            updates, s = update_weighted(t, updates, old, params, weight)
            new_state.append(written_into(old, s) if writes else s)
        return updates, tuple(new_state)

    weighted = any(isinstance(t, WeightedTransformation) for t in transforms)
    return (WeightedTransformation if weighted else GradientTransformation)(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, keeping each parameter's dtype.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> fx.optim.apply_updates(params, {"w": torch.tensor([-0.3, -0.4])})
        {'w': tensor([ 0.7000, -2.4000])}
        >>> fx.optim.apply_updates({"w": torch.ones(1, dtype=torch.bfloat16)},
        ...                        {"w": torch.tensor([0.5])})  # a float32 update, bf16 param
        {'w': tensor([1.5000], dtype=torch.bfloat16)}
    """
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def _find_state(opt_state: Any, kind: type) -> Any:
    """The first state of type ``kind`` inside ``opt_state`` (through tuples, lists and dicts,
    so inside chains, wrappers and groups), or None."""
    if isinstance(opt_state, kind):
        return opt_state
    children = opt_state.values() if isinstance(opt_state, dict) else (
        opt_state if isinstance(opt_state, tuple | list) else ())
    for child in children:
        found = _find_state(child, kind)
        if found is not None:
            return found
    return None
