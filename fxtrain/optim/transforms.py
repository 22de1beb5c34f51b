"""Gradient transformations: each a factory returning ``GradientTransformation(init, update)``.

Hyperparameters may be Python numbers or 0-d tensors (``inject_hyperparams`` passes tensors),
so the same maths serves fixed and run-time-changeable settings without recompiling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..tree import check_same_structure, first_leaf, global_norm, tree_map, tree_zeros_like
from .base import GradientTransformation, ScalarOrSchedule

__all__ = [
    "ScaleByAdamState", "TraceState", "ScaleByRmsState", "ScaleByLionState", "ScaleByLearningRateState",
    "scale", "scale_by_adam", "scale_by_rms", "scale_by_lion", "trace", "add_decayed_weights",
    "clip_by_global_norm", "scale_by_learning_rate", "scale_by_schedule",
]


def _count(params: Any) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=first_leaf(params).device)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _scalar(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter ready to combine with ``like``: floats stay floats, tensors are cast."""
    return x.to(like.dtype) if isinstance(x, torch.Tensor) else x


def _bias_correction(beta: float | torch.Tensor, count: torch.Tensor, like: torch.Tensor):
    """1 - beta ** count, computed in float32 or wider."""
    dtype = _acc_dtype(like)
    base = beta.to(dtype) if isinstance(beta, torch.Tensor) else torch.tensor(beta, dtype=dtype,
                                                                               device=like.device)
    return 1 - torch.pow(base, count.to(dtype))


def _check_state(state_tree: Any, updates: Any, transform: str) -> None:
    check_same_structure(updates, state_tree, f"the state of {transform}")


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """u -> step_size * u.

    Examples:
        >>> tx = fx.optim.scale(-0.5)
        >>> tx.update({"w": torch.tensor([2.0, 4.0])}, tx.init(None))[0]
        {'w': tensor([-1., -2.])}
    """

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return tree_map(lambda u: u * _scalar(step_size, u), updates), state

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_adam(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                  eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """Adam's direction (Kingma & Ba, 2014).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Examples:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = fx.optim.scale_by_adam()
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> updates["w"], int(state.count)
        (tensor([ 1.0000, -1.0000]), 1)
    """

    def init(params):
        return ScaleByAdamState(_count(params), tree_zeros_like(params), tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_adam")
        count = state.count + 1
        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(b1, g)), state.mu, updates)
        nu = tree_map(lambda v, g: v * _scalar(b2, g) + (1 - _scalar(b2, g)) * g * g,
                      state.nu, updates)

        def direction(m, v):
            bc1 = _bias_correction(b1, count, m).to(m.dtype)
            bc2 = _bias_correction(b2, count, m).to(m.dtype)
            return (m / bc1) / (torch.sqrt(v) / torch.sqrt(bc2) + _scalar(eps, m))

        return tree_map(direction, mu, nu), ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    trace: Any


def trace(decay: float | torch.Tensor, nesterov: bool = False) -> GradientTransformation:
    """Momentum: t <- g + decay t; u = t, or g + decay t with Nesterov.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.trace(0.9)
        >>> state = tx.init(params)
        >>> for g in (1.0, 1.0):
        ...     updates, state = tx.update({"w": torch.tensor([g])}, state)
        >>> updates["w"]  # 1 + 0.9 * 1
        tensor([1.9000])
    """

    def init(params):
        return TraceState(tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.trace, updates, "trace")
        new = tree_map(lambda t, g: g + _scalar(decay, g) * t, state.trace, updates)
        out = tree_map(lambda t, g: g + _scalar(decay, g) * t, new, updates) if nesterov else new
        return out, TraceState(new)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    nu: Any
    mu: Any  # running mean of g when centered, else None


def scale_by_rms(decay: float | torch.Tensor = 0.99, eps: float | torch.Tensor = 1e-8,
                 centered: bool = False) -> GradientTransformation:
    """RMSprop's direction: v <- decay v + (1 - decay) g^2; u = g / (sqrt(v - m^2) + eps).

    Examples:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = fx.optim.scale_by_rms(decay=0.75)
        >>> tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(params))[0]["w"]
        tensor([ 2., -2.])
    """

    def init(params):
        return ScaleByRmsState(tree_zeros_like(params), tree_zeros_like(params) if centered else None)

    def update(updates, state, params=None):
        del params
        _check_state(state.nu, updates, "scale_by_rms")
        nu = tree_map(lambda v, g: v * _scalar(decay, g) + (1 - _scalar(decay, g)) * g * g,
                      state.nu, updates)
        if centered:
            mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(decay, g)), state.mu, updates)
            var = tree_map(lambda v, m: v - m * m, nu, mu)
        else:
            mu, var = None, nu
        out = tree_map(lambda g, v: g / (torch.sqrt(v) + _scalar(eps, g)), updates, var)
        return out, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    mu: Any


def scale_by_lion(b1: float | torch.Tensor = 0.9,
                  b2: float | torch.Tensor = 0.99) -> GradientTransformation:
    """Lion (Chen et al., 2023): u = sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g.

    Examples:
        >>> params = {"w": torch.zeros(3)}
        >>> tx = fx.optim.scale_by_lion()
        >>> tx.update({"w": torch.tensor([0.2, -0.1, 0.0])}, tx.init(params))[0]["w"]
        tensor([ 1., -1.,  0.])
    """

    def init(params):
        return ScaleByLionState(tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_lion")
        out = tree_map(lambda m, g: torch.sign(torch.lerp(m, g, 1 - _scalar(b1, g))), state.mu, updates)
        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(b2, g)), state.mu, updates)
        return out, ScaleByLionState(mu)

    return GradientTransformation(init, update)


Mask = Callable[[str, torch.Tensor], bool] | Mapping[str, bool] | None


def _mask_fn(mask: Mask) -> Callable[[str, torch.Tensor], bool]:
    if mask is None:
        return lambda name, p: True
    if isinstance(mask, Mapping):
        return lambda name, p: bool(mask[name])
    return mask


def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0,
                        mask: Mask = None) -> GradientTransformation:
    """u -> u + weight_decay * p, for the parameters ``mask(name, p)`` selects (default all).

    ``mask`` is a predicate on the parameter's name and value, or a dict of bools by name;
    the parameters must then be a flat dict, as ``TrainState.params`` is.

    Examples:
        >>> params = {"weight": torch.tensor([2.0]), "bias": torch.tensor([2.0])}
        >>> tx = fx.optim.add_decayed_weights(0.1, mask=lambda name, p: name == "weight")
        >>> grads = {"weight": torch.tensor([1.0]), "bias": torch.tensor([1.0])}
        >>> tx.update(grads, tx.init(params), params)[0]
        {'weight': tensor([1.2000]), 'bias': tensor([1.])}
    """
    selected = _mask_fn(mask)

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params; call update(grads, state, params)")
        if mask is not None and not isinstance(params, Mapping):
            raise TypeError("add_decayed_weights(mask=...) needs params as a dict of tensors")
        if isinstance(params, Mapping):
            out = {k: u + _scalar(weight_decay, u) * params[k] if selected(k, params[k]) else u
                   for k, u in updates.items()}
        else:
            out = tree_map(lambda u, p: u + _scalar(weight_decay, u) * p, updates, params)
        return out, state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Scales all updates by min(1, max_norm / ||u||) so that their global norm is <= max_norm.

    Examples:
        >>> tx = fx.optim.clip_by_global_norm(1.0)
        >>> grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
        >>> updates, _ = tx.update(grads, tx.init(None))
        >>> updates, fx.optim.global_norm(updates)
        ({'a': tensor([0.6000]), 'b': tensor([0.8000])}, tensor(1.))
    """

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        factor = torch.clamp(max_norm / norm, max=1.0)
        return tree_map(lambda u: u * factor.to(u.dtype), updates), state

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    count: torch.Tensor
    learning_rate: torch.Tensor  # the rate used by the last update (for metrics)


def _rate(lr: ScalarOrSchedule, count: torch.Tensor) -> float | torch.Tensor:
    return lr(count) if callable(lr) else lr


def scale_by_learning_rate(learning_rate: ScalarOrSchedule,
                           flip_sign: bool = True) -> GradientTransformation:
    """u -> -lr u (or lr u without ``flip_sign``); ``lr`` a number, 0-d tensor or schedule.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.scale_by_learning_rate(fx.optim.linear_schedule(1.0, 0.5, 1))
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([2.0])}, state)
        ...     print(updates["w"])
        tensor([-2.])
        tensor([-1.])
    """
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        count = _count(params)
        lr = _rate(learning_rate, count)
        return ScaleByLearningRateState(count, torch.as_tensor(lr, dtype=torch.float32,
                                                               device=count.device).clone())

    def update(updates, state, params=None):
        del params
        lr = _rate(learning_rate, state.count)
        out = tree_map(lambda u: u * (sign * _scalar(lr, u)), updates)
        lr_t = lr.to(torch.float32) if isinstance(lr, torch.Tensor) else torch.full_like(
            state.learning_rate, lr)
        return out, ScaleByLearningRateState(state.count + 1, lr_t)

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Callable[[torch.Tensor], torch.Tensor]) -> GradientTransformation:
    """u -> schedule(count) u, without flipping the sign.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.scale_by_schedule(fx.optim.constant_schedule(0.25))
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(params))[0]["w"]
        tensor([0.5000])
    """
    return scale_by_learning_rate(schedule, flip_sign=False)
