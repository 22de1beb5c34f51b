"""Transforms that wrap other transforms: run-time hyperparameters, accumulation, skipping.

All three choose between branches with ``torch.where`` on whole trees, so they stay one graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..tree import first_leaf, tree_map, tree_select, tree_zeros_like
from .base import GradientTransformation, WeightedTransformation, update_weighted
from .masks import rebinding, with_tied
from .transforms import ScaleByLearningRateState


class InjectHyperparamsState(NamedTuple):
    """The state ``inject_hyperparams`` keeps between steps."""

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def _is_numeric(value: Any) -> bool:
    return callable(value) or isinstance(value, int | float | torch.Tensor) and not isinstance(
        value, bool)


def inject_hyperparams(factory: Callable[..., GradientTransformation], *,
                       static_args: Sequence[str] = ()) -> Callable[..., GradientTransformation]:
    """Makes ``factory``'s numeric arguments 0-d tensors in the optimizer state.

    A number is stored once; a schedule is evaluated at each update. A callback can then set
    ``opt_state.hyperparams['learning_rate']`` to a new tensor without a recompile.

    Examples:
        >>> tx = fx.optim.inject_hyperparams(fx.optim.adamw)(learning_rate=1e-3, weight_decay=0.01)
        >>> opt_state = tx.init({"w": torch.zeros(2)})
        >>> fx.optim.injected_hyperparams(opt_state)
        {'learning_rate': tensor(0.0010), 'weight_decay': tensor(0.0100)}
    """

    def wrapped(**kwargs: Any) -> GradientTransformation:
        numeric = {k: v for k, v in kwargs.items() if k not in static_args and _is_numeric(v)}
        static = {k: v for k, v in kwargs.items() if k not in numeric}
        if not numeric:
            raise ValueError(f"inject_hyperparams({factory.__name__}) got no numeric "
                             "hyperparameter to inject")

        def values(count, stored, dtype):
            return {k: v(count).to(dtype) if callable(v) else stored[k] for k, v in numeric.items()}

        def init(params):
            leaf = first_leaf(params)
            dtype = torch.float64 if leaf.dtype == torch.float64 else torch.float32
            count = torch.zeros((), dtype=torch.int64, device=leaf.device)
            stored = {k: torch.as_tensor(v(count) if callable(v) else v, dtype=dtype,
                                         device=leaf.device).clone() for k, v in numeric.items()}
            return InjectHyperparamsState(count, stored, factory(**static, **stored).init(params))

        def update(updates, state, params=None):
            dtype = next(iter(state.hyperparams.values())).dtype
            hparams = values(state.count, state.hyperparams, dtype)
            updates, inner = factory(**static, **hparams).update(updates, state.inner_state, params)
            return updates, InjectHyperparamsState(state.count + 1, hparams, inner)

        def rebind(groups):  # the transformation factory makes, made with the tied names
            def tied_factory(**arguments):
                return with_tied(factory(**arguments), groups)
            tied_factory.__name__ = getattr(factory, "__name__", "factory")
            return inject_hyperparams(tied_factory, static_args=static_args)(**kwargs)

        return GradientTransformation(init, update, rebind)

    return wrapped


class MultiStepsState(NamedTuple):
    """The state ``multi_steps`` keeps between steps."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: Any
    acc_grads: Any
    skip_state: Any = None  # what should_skip_update_fn last reported (None without one)
    acc_weight: Any = None  # the weights summed with acc_grads (see multi_steps)

    # newer than checkpoints written before it: restored with the template's value
    _optional_in_checkpoints = frozenset({"acc_weight"})


ShouldSkipUpdateFunction = Callable[[Any, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def multi_steps(tx: GradientTransformation, every_k: int, *,
                should_skip_update_fn: ShouldSkipUpdateFunction | None = None
                ) -> GradientTransformation:
    """Gradient accumulation: applies ``tx`` to the mean of ``every_k`` gradients.

    The other ``every_k - 1`` calls return zero updates and leave ``tx``'s state untouched.
    Each gradient counts by the ``weight=`` its ``update`` is given (a train step whose
    ``loss_fn`` returns ``fx.losses.Mean`` gives its token count): the update is then
    ``sum(weight * gradient) / sum(weight)``, the gradient of the one batch that holds every
    micro-batch's tokens. Without weights each gradient counts alike: the plain mean of the
    micro-batches' means. Give a weight to every call or to none.
    ``should_skip_update_fn(updates, gradient_step, params) -> (skip, skip_state)`` (optax's
    ``MultiSteps`` argument, e.g. ``skip_large_updates`` or ``skip_not_finite``) rejects a
    mini-step: zero updates, and the state as if it never happened, but for ``skip_state``.
    Unlike optax's ``MultiSteps``, the gradients are summed in their own dtype (optax keeps a
    running mean, in float32 by default) and ``every_k`` is a number, not a schedule.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.multi_steps(fx.optim.sgd(1.0), every_k=2)
        >>> state = tx.init(params)
        >>> for g in (1.0, 3.0):
        ...     updates, state = tx.update({"w": torch.tensor([g])}, state, params)
        ...     print(updates["w"])
        tensor([0.])
        tensor([-2.])
    """
    if every_k < 1:
        raise ValueError(f"multi_steps needs every_k >= 1, got {every_k}")

    def should_skip(updates, gradient_step, params):
        if should_skip_update_fn is None:
            return None, None
        skip, skip_state = should_skip_update_fn(updates, gradient_step, params)
        if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.ndim != 0:
            raise ValueError("multi_steps: should_skip_update_fn must return a 0-d bool tensor "
                             f"first, got {skip!r}")
        return skip, skip_state

    def init(params):
        zero = torch.zeros((), dtype=torch.int64, device=first_leaf(params).device)
        _, skip_state = should_skip(tree_zeros_like(params), zero, params)
        return MultiStepsState(zero, zero.clone(), tx.init(params), tree_zeros_like(params),
                               skip_state, torch.zeros((), device=zero.device))

    def update(updates, state, params=None, weight=None):
        skip, skip_state = should_skip(updates, state.gradient_step, params)
        emit = state.mini_step == every_k - 1
        acc_weight = state.acc_weight
        if weight is None:  # the plain mean
            acc = tree_map(lambda a, g: a + g, state.acc_grads, updates)
            mean = tree_map(lambda a: a / every_k, acc)
        else:  # each gradient by its weight (a token count)
            weight = torch.as_tensor(weight, dtype=torch.float32)
            acc = tree_map(lambda a, g: a + (g * weight).to(a.dtype), state.acc_grads, updates)
            acc_weight = acc_weight + weight
            total = acc_weight.clamp_min(torch.finfo(torch.float32).tiny)  # none: zeros
            mean = tree_map(lambda a: (a / total).to(a.dtype), acc)
        inner_updates, inner = update_weighted(tx, mean, state.inner_state, params,
                                               None if weight is None else acc_weight)
        new_state = MultiStepsState(
            torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1),
            state.gradient_step + emit.to(torch.int64),
            tree_select(emit, inner, state.inner_state),
            tree_select(emit, tree_zeros_like(acc), acc),
            skip_state,
            torch.where(emit, torch.zeros_like(acc_weight), acc_weight),
        )
        out = tree_select(emit, inner_updates, tree_zeros_like(inner_updates))
        if skip is None:
            return out, new_state
        return (tree_select(skip, tree_zeros_like(out), out),
                tree_select(skip, state._replace(skip_state=skip_state), new_state))

    return WeightedTransformation(init, update, rebinding(
        lambda groups: multi_steps(with_tied(tx, groups), every_k,
                                   should_skip_update_fn=should_skip_update_fn), tx))


def _sum_of_squares(tree: Any) -> torch.Tensor:
    return sum([torch.sum(leaf.to(torch.promote_types(leaf.dtype, torch.float32)) ** 2)
                for leaf in pytree.tree_leaves(tree)])


def skip_large_updates(updates: Any, gradient_step: torch.Tensor, params: Any,
                       max_squared_norm: float | torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A ``should_skip_update_fn`` for ``multi_steps``: skip when ||updates||^2 is not below
    ``max_squared_norm`` (NaN included), as optax's.

    Bind ``max_squared_norm`` with ``functools.partial``. Returns ``(should_skip,
    {"should_skip": ..., "norm_squared": ...})``, the dict kept as ``MultiStepsState.skip_state``.

    Examples:
        >>> import functools
        >>> skip = functools.partial(fx.optim.skip_large_updates, max_squared_norm=10.0)
        >>> tx = fx.optim.multi_steps(fx.optim.sgd(1.0), every_k=1, should_skip_update_fn=skip)
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> updates["w"], state.skip_state
        (tensor([0., 0.]), {'should_skip': tensor(True), 'norm_squared': tensor(25.)})
    """
    del gradient_step, params
    norm_sq = _sum_of_squares(updates)
    should_skip = ~(norm_sq < max_squared_norm)
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


def skip_not_finite(updates: Any, gradient_step: torch.Tensor,
                    params: Any) -> tuple[torch.Tensor, dict]:
    """A ``should_skip_update_fn`` for ``multi_steps``: skip updates holding NaN or inf.

    Returns ``(should_skip, {"should_skip": ..., "num_not_finite": ...})``, as optax's.

    Examples:
        >>> skip, info = fx.optim.skip_not_finite({"w": torch.tensor([1.0, float("nan")])},
        ...                                       torch.tensor(0), None)
        >>> skip, info["num_not_finite"]
        (tensor(True), tensor(1))
    """
    del gradient_step, params
    num = sum([torch.sum(~torch.isfinite(leaf)) for leaf in pytree.tree_leaves(updates)])
    return num > 0, {"should_skip": num > 0, "num_not_finite": num}


class ApplyIfFiniteState(NamedTuple):
    """The state ``apply_if_finite`` keeps between steps."""

    notfinite_count: torch.Tensor   # consecutive non-finite updates
    last_finite: torch.Tensor       # whether the last update was finite
    total_notfinite: torch.Tensor   # all non-finite updates so far
    inner_state: Any


def all_finite(tree: Any) -> torch.Tensor:
    """A 0-d bool tensor: every element of every leaf is finite.

    Examples:
        >>> fx.optim.all_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
        tensor(False)
    """
    return torch.stack([torch.isfinite(leaf).all() for leaf in pytree.tree_leaves(tree)]).all()


def apply_if_finite(tx: GradientTransformation,
                    max_consecutive_errors: int | None = None) -> GradientTransformation:
    """Skips updates whose gradients hold NaN or inf, counting them in the state.

    After ``max_consecutive_errors`` skips in a row the update is applied anyway, so a run that
    has truly diverged shows it; ``None`` skips for ever.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.apply_if_finite(fx.optim.sgd(1.0))
        >>> grads = {"w": torch.tensor([float("inf")])}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> updates["w"], int(state.notfinite_count)
        (tensor([0.]), 1)
    """

    def init(params):
        zero = torch.zeros((), dtype=torch.int64, device=first_leaf(params).device)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=zero.device),
                                  zero.clone(), tx.init(params))

    def update(updates, state, params=None):
        finite = all_finite(updates)
        apply = finite if max_consecutive_errors is None else (
            finite | (state.notfinite_count >= max_consecutive_errors))
        inner_updates, inner = tx.update(updates, state.inner_state, params)
        new_state = ApplyIfFiniteState(
            torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1),
            finite,
            state.total_notfinite + (~finite).to(torch.int64),
            tree_select(apply, inner, state.inner_state),
        )
        return tree_select(apply, inner_updates, tree_zeros_like(inner_updates)), new_state

    return GradientTransformation(init, update, rebinding(
        lambda groups: apply_if_finite(with_tied(tx, groups), max_consecutive_errors), tx))


def learning_rate(opt_state: Any) -> torch.Tensor | None:
    """The learning rate recorded in ``opt_state`` (injected or last used), or None.

    Examples:
        >>> tx = fx.optim.adamw(fx.optim.linear_schedule(1e-3, 0.0, 10))
        >>> opt_state = tx.init({"w": torch.zeros(1)})
        >>> fx.optim.learning_rate(opt_state)
        tensor(0.0010)
    """
    if isinstance(opt_state, InjectHyperparamsState) and opt_state.hyperparams and \
            "learning_rate" in opt_state.hyperparams:
        return opt_state.hyperparams["learning_rate"]
    if isinstance(opt_state, ScaleByLearningRateState):
        return opt_state.learning_rate
    if isinstance(opt_state, tuple | list):
        for sub in opt_state:
            found = learning_rate(sub)
            if found is not None:
                return found
    return None


def injected_hyperparams(opt_state: Any) -> dict[str, torch.Tensor]:
    """The hyperparameters injected anywhere in ``opt_state`` (the first of each name).

    Examples:
        >>> tx = fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=0.1, momentum=0.9)
        >>> sorted(fx.optim.injected_hyperparams(tx.init({"w": torch.zeros(1)})))
        ['learning_rate', 'momentum']
    """
    if isinstance(opt_state, InjectHyperparamsState):
        return {**injected_hyperparams(opt_state.inner_state), **opt_state.hyperparams}
    found: dict[str, torch.Tensor] = {}
    if isinstance(opt_state, tuple | list):
        for sub in reversed(opt_state):
            found.update(injected_hyperparams(sub))
    return found


def map_hyperparams(opt_state: Any, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``opt_state`` with ``fn`` applied to every injected hyperparameter called ``name``.

    Raises KeyError when none is injected, naming the ones that are.

    Examples:
        >>> tx = fx.optim.inject_hyperparams(fx.optim.adamw)(learning_rate=1e-3)
        >>> opt_state = tx.init({"w": torch.zeros(1)})
        >>> opt_state = fx.optim.map_hyperparams(opt_state, "learning_rate", lambda lr: lr * 0.5)
        >>> fx.optim.learning_rate(opt_state)
        tensor(0.0005)
    """
    injected_hyperparam(opt_state, name)  # raises when there is none
    return _map_injected(opt_state, name, fn)


def injected_hyperparam(opt_state: Any, name: str) -> torch.Tensor:
    """The injected hyperparameter ``name``; KeyError naming the injected ones if absent."""
    found = injected_hyperparams(opt_state)
    if name not in found:
        raise KeyError(f"no injected hyperparameter {name!r} in the optimizer state (injected: "
                       f"{sorted(found)}); build the optimizer with "
                       f"fx.optim.inject_hyperparams(...)({name}=...)")
    return found[name]


def _map_injected(opt_state: Any, name: str, fn: Callable) -> Any:
    if isinstance(opt_state, InjectHyperparamsState):
        hp = opt_state.hyperparams
        hp = {**hp, name: fn(hp[name])} if name in hp else hp
        return opt_state._replace(hyperparams=hp,
                                  inner_state=_map_injected(opt_state.inner_state, name, fn))
    if isinstance(opt_state, tuple) and type(opt_state) is not tuple:  # a NamedTuple state
        return type(opt_state)(*(_map_injected(s, name, fn) for s in opt_state))
    if isinstance(opt_state, tuple | list):
        return type(opt_state)(_map_injected(s, name, fn) for s in opt_state)
    return opt_state
