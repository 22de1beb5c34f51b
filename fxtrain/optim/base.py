"""The optimizer abstraction: a pair of pure functions, and their composition.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; the new
parameters are ``params + updates`` (see ``apply_updates``). A transform without state uses
``None`` as its state (never an empty container: Dynamo mis-traces those next to 0-d tensors).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..distributed import is_dtensor
from ..donation import written_into
from ..tree import tree_map
from .masks import rebinding, with_tied

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A learning-rate (or other) schedule: the step count, a 0-d tensor, to a 0-d tensor."""
ScalarOrSchedule = float | torch.Tensor | Schedule
Fused = Callable[[dict, Any, dict, bool], tuple[dict, Any] | None]
"""``fused(grads, opt_state, params, donated) -> (params, opt_state)``, or None where it does
not apply (the caller runs the composable update): a transformation's update and its
application in one pass (``fxtrain.optim.fused``). Every tensor is a plain local one, none
needing a gradient; ``donated``: the caller gives ``params`` and ``opt_state`` up."""


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``;
    ``with_tied(groups)``: the same transformation with its name masks reading the tied names
    ``groups`` (``fx.optim.masks.with_tied``), None for one without a name mask (a transform
    of your own leaves it out); ``fused``: the update and its application in one pass of
    ``torch._foreach_*`` ops for an eager step (``fxtrain.optim.fused``; ``adam`` and
    ``adamw`` have one), None for the update then ``apply_updates``.

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
    with_tied: Callable[[Any], GradientTransformation] | None = None
    fused: Fused | None = None


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


class InPlace:
    """What an eager update may write into when its caller gives its inputs up (a donating
    step: ``TrainState.apply_gradients(donated=True)``, ``fxtrain.donation``), as
    ``torch.optim`` updates in place; passed to a transformation as ``update(...,
    in_place=...)`` where it takes that keyword (``in_place_update``):

    - ``state``: the optimizer state given up. A transformation given this very state may write
      its new one over it (Adam's new moments never sit beside the old ones); a ``chain`` given
      it writes each transform's new state into it and hands each transform ``part(its
      state)``. A chain inside another transform is given a part of its caller's state and
      writes nothing: that transform may still read its old state.
    - ``params``: the parameters given up; ``apply_updates(params, updates, in_place=...)``
      adds the updates into them.
    - the temporaries this update made (``own``): a later transform writes its result into
      them (``owns``), never into the gradients it was given.

    The same operations, so the same bits. An eager AdamW update then allocates one tree of
    the parameters' size (its direction) where it allocated a dozen. Compiled, the graph writes
    the donated state in place by itself, and no step passes one.

    Examples:
        >>> tx = fx.optim.adamw(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> mu = state[0].mu["w"]
        >>> into = fx.optim.base.InPlace(state, params)
        >>> updates, new = fx.optim.update_weighted(tx, {"w": torch.ones(2)}, state, params,
        ...                                         None, in_place=into)
        >>> new[0].mu["w"] is mu, fx.optim.apply_updates(params, updates, in_place=into) is params
        (True, True)
    """

    __slots__ = ("state", "params", "_made")

    def __init__(self, state: OptState, params: Params | None = None,
                 made: weakref.WeakValueDictionary | None = None):
        self.state, self.params = state, params
        self._made = weakref.WeakValueDictionary() if made is None else made

    def part(self, state: OptState) -> InPlace:
        """The same update's view for a transform given ``state`` (a part of this one)."""
        return InPlace(state, self.params, self._made)

    def own(self, tree: Any) -> Any:
        """``tree``, its tensors marked as temporaries this update made."""
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                self._made[id(leaf)] = leaf
        return tree

    def owns(self, u: Any) -> bool:
        """Whether ``u`` is a temporary this update made (``own``)."""
        return self._made.get(id(u)) is u


def in_place_update(update: Callable) -> Callable:
    """Marks a transformation's ``update`` as taking ``in_place=`` (an ``InPlace`` or None)."""
    update.in_place = True
    return update


def takes_in_place(tx: GradientTransformation) -> bool:
    """Whether ``tx.update`` takes ``in_place=`` (``in_place_update``)."""
    return getattr(tx.update, "in_place", False)


def writable(state: OptState, in_place: InPlace | None) -> bool:
    """Whether a transformation given ``state`` may write its new state over it."""
    return in_place is not None and in_place.state is state


def own(tree: Any, in_place: InPlace | None) -> Any:
    """``tree``, its tensors marked as temporaries of the update ``in_place`` (if any)."""
    return tree if in_place is None else in_place.own(tree)


def owns(u: Any, in_place: InPlace | None) -> bool:
    """Whether ``u`` is a temporary the update ``in_place`` made: a transform may write its
    result into it. Never a gradient the update was given."""
    return in_place is not None and in_place.owns(u)


def update_weighted(tx: GradientTransformation, updates: Updates, state: OptState,
                    params: Params | None, weight: torch.Tensor | None, *,
                    in_place: InPlace | None = None) -> tuple[Updates, OptState]:
    """``tx.update``, with ``weight=`` when ``tx`` takes one (``WeightedTransformation``)
    and a weight is given; a plain transformation is called as always (the weight says how
    gradients compare with each other, and it is given one at a time). ``in_place``: what
    the update may write into (``InPlace``), for a transformation that takes it.

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
    extra = {} if in_place is None or not takes_in_place(tx) else {"in_place": in_place}
    if weight is not None and isinstance(tx, WeightedTransformation):
        return tx.update(updates, state, params, weight=weight, **extra)
    return tx.update(updates, state, params, **extra)


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

    @in_place_update
    def update(updates, state, params=None, weight=None, in_place=None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of "
                             f"{type(state).__name__}; was it made by another optimizer?")
        if writable(state, in_place):
            return _writing_over(transforms, updates, state, params, weight, in_place)
        new_state = []
        for t, old in zip(transforms, state):
            updates, s = update_weighted(t, updates, old, params, weight)
            new_state.append(s)
        return updates, tuple(new_state)

    weighted = any(isinstance(t, WeightedTransformation) for t in transforms)
    elementwise = all(isinstance(t, ElementwiseTransformation) for t in transforms)
    kind = WeightedTransformation if weighted else (
        ElementwiseTransformation if elementwise else GradientTransformation)
    return kind(init, update, rebinding(
        lambda groups: chain(*(with_tied(t, groups) for t in transforms)), *transforms))


def _writing_over(transforms: tuple, updates: Updates, state: tuple, params: Params,
                  weight: Any, in_place: InPlace) -> tuple[Updates, tuple]:
    """A chain's update that writes each transform's new state into ``state`` (its caller's,
    given up: ``InPlace``); each transform may write over the state it is handed
    (``InPlace.part``), and a part of one, which a wrapper may still choose, is not."""
    new_state = []
    for t, old in zip(transforms, state):
        updates, s = update_weighted(t, updates, old, params, weight, in_place=in_place.part(old))
        new_state.append(written_into(old, s))
    return updates, tuple(new_state)


def apply_updates(params: Params, updates: Updates, *,
                  in_place: InPlace | None = None) -> Params:
    """``params + updates``, keeping each parameter's dtype; added into ``params`` where the
    update was given them up (``in_place.params is params``: an eager donated step, as
    ``torch.optim`` does).

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> fx.optim.apply_updates(params, {"w": torch.tensor([-0.3, -0.4])})
        {'w': tensor([ 0.7000, -2.4000])}
        >>> fx.optim.apply_updates({"w": torch.ones(1, dtype=torch.bfloat16)},
        ...                        {"w": torch.tensor([0.5])})  # a float32 update, bf16 param
        {'w': tensor([1.5000], dtype=torch.bfloat16)}
    """
    if _given_up(params, updates, in_place):
        with torch.no_grad():
            for k, p in params.items():
                _local(p).add_(_local(updates[k]))
        return params
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _given_up(params: Params, updates: Updates, in_place: InPlace | None) -> bool:
    """Whether ``apply_updates`` may add ``updates`` into ``params`` (given up: ``InPlace``):
    distinct tensors that need no gradient, each update of its parameter's dtype and shape, a
    DTensor's laid out as its parameter."""
    if (in_place is None or in_place.params is not params
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
