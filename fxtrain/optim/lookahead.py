"""Lookahead (Zhang et al., 2019): k steps forward with a fast optimizer, one step back.

optax keeps both parameter sets in the params, as ``LookaheadParams(fast, slow)``, and returns
updates for both. Here the params a step sees, ``TrainState.params``, are the fast ones (the
gradients are taken there), and the slow ones live in the optimizer state, so ``TrainState``,
``make_train_step`` and checkpoints work unchanged; ``lookahead_params(opt_state, params)``
gives optax's ``LookaheadParams`` back, its ``slow`` field being the parameters to evaluate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..tree import tree_map, tree_select
from .base import GradientTransformation, _find_state
from .masks import rebinding, with_tied
from .transforms import _check_state, _count, _scalar


class LookaheadState(NamedTuple):
    """The state ``lookahead`` keeps between steps."""

    fast_state: Any
    steps_since_sync: torch.Tensor
    slow: Any  # the slow parameters (optax keeps them in LookaheadParams.slow)


class LookaheadParams(NamedTuple):
    """The fast parameters (where gradients are taken) and the slow ones (to evaluate)."""

    fast: Any
    slow: Any

    @classmethod
    def init_synced(cls, params: Any) -> LookaheadParams:
        """Both sets equal to ``params``."""
        return cls(fast=params, slow=params)


def lookahead(fast_optimizer: GradientTransformation, sync_period: int,
              slow_step_size: float | torch.Tensor,
              reset_state: bool = False) -> GradientTransformation:
    """Steps with ``fast_optimizer``; every ``sync_period`` steps pulls the slow parameters
    towards the fast ones and restarts the fast ones from there.

    At a sync: slow <- slow + slow_step_size (fast - slow); fast <- slow. ``init(params)`` starts
    both from ``params`` (or from a ``LookaheadParams``); ``update(grads, state, params)`` takes
    the fast parameters and returns their updates, keeping the slow ones in the state. Do not
    change the updates before applying them, or the two sets fall out of step (as in optax).

    Args:
      fast_optimizer: the inner optimizer.
      sync_period: fast steps between syncs; >= 1.
      slow_step_size: how far the slow parameters move towards the fast ones; in [0, 1].
      reset_state: whether the fast optimizer's state restarts from ``init`` at each sync.

    Returns:
      A ``GradientTransformation`` whose state is a ``LookaheadState``.

    Examples:
        >>> params = {"w": torch.tensor([1.0])}
        >>> tx = fx.optim.lookahead(fx.optim.sgd(1.0), sync_period=2, slow_step_size=0.5)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        ...     params = fx.optim.apply_updates(params, updates)
        ...     print(params["w"], state.slow["w"])  # the fast reach -1, the slow go half-way
        tensor([0.]) tensor([1.])
        tensor([0.]) tensor([0.])
    """
    if not sync_period >= 1:
        raise ValueError(f"lookahead: sync_period must be >= 1, got {sync_period}")
    if isinstance(slow_step_size, (int, float)) and not 0 <= slow_step_size <= 1:
        raise ValueError(f"lookahead: slow_step_size must be in [0, 1], got {slow_step_size}")

    def init(params):
        fast, slow = (params.fast, params.slow) if isinstance(params, LookaheadParams) else (
            params, params)
        return LookaheadState(fast_optimizer.init(fast), _count(fast),
                              tree_map(lambda p: p.detach().clone(), slow))

    def update(updates, state, params=None):
        if params is None or isinstance(params, LookaheadParams):
            raise ValueError("lookahead needs the fast params: update(grads, state, params) with "
                             "params the fast parameters (the slow ones are in the state)")
        _check_state(state.slow, updates, "lookahead")
        updates, fast_state = fast_optimizer.update(updates, state.fast_state, params)
        sync = state.steps_since_sync == sync_period - 1
        diff = tree_map(lambda f, u, s: f + u - s, params, updates, state.slow)
        slow = tree_map(lambda s, d: s + torch.where(sync, _scalar(slow_step_size, d) * d, 0.0),
                        state.slow, diff)
        fast_updates = tree_map(lambda u, d: u - torch.where(
            sync, (1 - _scalar(slow_step_size, d)) * d, 0.0), updates, diff)
        if reset_state:
            fast_state = tree_select(sync, fast_optimizer.init(params), fast_state)
        steps = (state.steps_since_sync + 1) % sync_period
        return fast_updates, LookaheadState(fast_state, steps, slow)

    return GradientTransformation(init, update, rebinding(
        lambda groups: lookahead(with_tied(fast_optimizer, groups), sync_period, slow_step_size,
                                 reset_state), fast_optimizer))


def lookahead_params(opt_state: Any, params: Any) -> LookaheadParams:
    """optax's ``LookaheadParams(fast, slow)``: ``params`` as the fast ones, the slow from
    ``opt_state`` (a ``LookaheadState``, or a state holding one, as ``TrainState.opt_state``).

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.lookahead(
        ...     fx.optim.adam(1e-2), sync_period=5, slow_step_size=0.5))
        >>> pair = fx.optim.lookahead_params(state.opt_state, state.params)
        >>> x = torch.ones(1, 2)
        >>> bool(torch.equal(state.apply(pair.slow, x), state.apply(pair.fast, x)))  # synced
        True
    """
    found = _find_state(opt_state, LookaheadState)
    if found is None:
        raise ValueError(f"lookahead_params needs the state of a lookahead optimizer; got "
                         f"{type(opt_state).__name__}, which holds no LookaheadState")
    return LookaheadParams(fast=params, slow=found.slow)
