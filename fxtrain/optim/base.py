"""The optimizer abstraction: a pair of pure functions, and their composition.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; the new
parameters are ``params + updates`` (see ``apply_updates``). A transform without state uses
``None`` as its state (never an empty container: Dynamo mis-traces those next to 0-d tensors).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..distributed import is_dtensor
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


class ElementwiseTransformation(GradientTransformation):
    """A ``GradientTransformation`` that treats each leaf alone: each leaf of the updates and
    of the new state it returns is a function of the same leaf of the gradients, of its state
    and of the parameters, and of the state's scalars (a step count). Adam, SGD with momentum,
    weight decay and a learning rate are; a global norm clip, Muon or a factored second moment
    are not. An eager update of a sharded state (``fx.shard``) runs such a transformation on
    each rank's local shards, not through DTensor's dispatch (``fxtrain.optim._on_shards``).
    A ``chain`` of them is one.

    Examples:
        >>> isinstance(fx.optim.adamw(1e-3), fx.optim.ElementwiseTransformation)
        True
        >>> clipped = fx.optim.chain(fx.optim.clip_by_global_norm(1.0), fx.optim.adam(1e-3))
        >>> isinstance(clipped, fx.optim.ElementwiseTransformation)  # the norm spans leaves
        False
    """


_WRITES_INTO: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fxtrain_optim_writes_into", default=None)
_WRITES_PARAMS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fxtrain_optim_writes_params", default=None)
_OWN: contextvars.ContextVar[Any] = contextvars.ContextVar("fxtrain_optim_own", default=None)
_CHAIN_PARTS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fxtrain_optim_chain_parts", default=None)


@contextlib.contextmanager
def writing_into_state(opt_state: OptState, params: Params | None = None) -> Iterator[None]:
    """Inside, uncompiled, an update writes in place what its caller gives up (a step that
    donates its state and never reverts it: ``fxtrain.donation``), as ``torch.optim`` does:

    - a ``chain`` given ``opt_state`` itself (the optimizer's own, when it is a chain) writes
      each transform's new state into it as soon as the transform has run (a chain inside
      another transform is given a part of it and does not: that transform may still read
      its old state), and a transform given such a state may write its new one over it
      (``writable``): Adam's new moments never sit beside the old ones;
    - a transform writes its updates into the temporaries an earlier transform of this update
      made (``own`` and ``owns``), never into the gradients it was given;
    - ``apply_updates`` given ``params`` itself adds the updates into them.

    The same operations, so the same bits. An eager AdamW update then allocates one tree of
    the parameters' size (its direction) where it allocated a dozen. Compiled, the graph
    writes the donated state in place by itself."""
    tokens = (_WRITES_INTO.set(opt_state), _WRITES_PARAMS.set(params),
              _OWN.set(weakref.WeakValueDictionary()))
    try:
        yield
    finally:
        for var, token in zip((_WRITES_INTO, _WRITES_PARAMS, _OWN), tokens):
            var.reset(token)


def writable(state: OptState) -> bool:
    """Whether a transform may write its new ``state`` over the one it was given, in place
    (uncompiled, inside ``writing_into_state``, when ``state`` is one of the states the
    optimizer's own chain gives its transforms, and not a part of one: a wrapper such as
    ``apply_if_finite`` or ``multi_steps`` may still choose its inner transform's old state):
    as ``torch.optim`` updates Adam's moments, so that the new ones never sit beside the old
    ones."""
    parts = None if torch.compiler.is_compiling() else _CHAIN_PARTS.get()
    return parts is not None and any(state is s for s in parts)


def own(tree: Any) -> Any:
    """``tree``, its tensors marked as temporaries this update made, which a later transform
    may write into (inside ``writing_into_state``; otherwise nothing is marked)."""
    owned = None if torch.compiler.is_compiling() else _OWN.get()
    if owned is not None:
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                owned[id(leaf)] = leaf
    return tree


def owns(u: Any) -> bool:
    """Whether ``u`` is a temporary this update made (``own``): a transform may write its
    result into it. Never a gradient the update was given."""
    owned = None if torch.compiler.is_compiling() else _OWN.get()
    return owned is not None and owned.get(id(u)) is u


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

    return ElementwiseTransformation(init, update)


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
        if not writes:
            new_state = []
            for t, old in zip(transforms, state):
                updates, s = update_weighted(t, updates, old, params, weight)
                new_state.append(s)
            return updates, tuple(new_state)
        return _writing_over(transforms, updates, state, params, weight)

    weighted = any(isinstance(t, WeightedTransformation) for t in transforms)
    elementwise = all(isinstance(t, ElementwiseTransformation) for t in transforms)
    kind = WeightedTransformation if weighted else (
        ElementwiseTransformation if elementwise else GradientTransformation)
    return kind(init, update)


def _writing_over(transforms: tuple, updates: Updates, state: tuple, params: Params,
                  weight: Any) -> tuple[Updates, tuple]:
    """A chain's update that writes each transform's new state into ``state`` (its caller's,
    given up: ``writing_into_state``); its transforms may write over the states it hands them
    (``writable``), and a part of one, which a wrapper may still choose, is not among those."""
    new_state = []
    token = _CHAIN_PARTS.set(state)
    try:
        for t, old in zip(transforms, state):
            updates, s = update_weighted(t, updates, old, params, weight)
            new_state.append(written_into(old, s))
    finally:
        _CHAIN_PARTS.reset(token)
    return updates, tuple(new_state)


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
    if _given_up(params, updates):  # an eager donated step: as torch.optim, in place
        with torch.no_grad():
            for k, p in params.items():
                _local(p).add_(_local(updates[k]))
        return params
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _given_up(params: Params, updates: Updates) -> bool:
    """Whether ``apply_updates`` may add ``updates`` into ``params`` (``writing_into_state``):
    distinct tensors that need no gradient, each update of its parameter's dtype and shape, a
    DTensor's laid out as its parameter."""
    if (torch.compiler.is_compiling() or _WRITES_PARAMS.get() is not params
            or not isinstance(params, dict) or not isinstance(updates, dict)
            or params.keys() != updates.keys()
            or len({id(p) for p in params.values()}) != len(params)):
        return False
    for k, p in params.items():
        u = updates[k]
        if (not isinstance(p, torch.Tensor) or not isinstance(u, torch.Tensor) or p.requires_grad
                or u.requires_grad or p.dtype != u.dtype or p.shape != u.shape
                or is_dtensor(p) != is_dtensor(u) or (is_dtensor(p) and (
                    p.placements != u.placements or p.device_mesh != u.device_mesh))):
            return False
    return True


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
