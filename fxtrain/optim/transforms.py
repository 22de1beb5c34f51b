"""Gradient transformations: each a factory returning ``GradientTransformation(init, update)``.

Hyperparameters may be Python numbers or 0-d tensors (``inject_hyperparams`` passes tensors),
so the same maths serves fixed and run-time-changeable settings without recompiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..tree import check_same_structure, first_leaf, global_norm, tree_map, tree_zeros_like
from .base import (ElementwiseTransformation, GradientTransformation, InPlace, ScalarOrSchedule,
                   in_place_update, own, owns, writable)
from .masks import Mask, Tied, by_name, check, is_names


def _count(params: Any) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=first_leaf(params).device)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _scalar(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter ready to combine with ``like``: floats stay floats, tensors are cast."""
    return x.to(like.dtype) if isinstance(x, torch.Tensor) else x


def _wide(device: torch.device) -> torch.dtype:
    """float64, where the device has it (MPS has none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _bias_correction(beta: float | torch.Tensor, count: torch.Tensor, like: torch.Tensor):
    """1 - beta ** count in float64, as ``torch.optim`` computes it on the host.

    In float32 the rounding of beta itself puts 1 - 0.999 off by 1.3e-5 relative, and every
    float32 Adam step came out that much smaller than torch's. Callers round the result, or its
    square root, to their dtype once. A 0-d tensor op: one graph, no recompile as count grows.

    Written as ``exp(count * log(beta))`` (the same float32 values as ``pow`` for t up to 2e6 and
    the usual betas): Inductor computes exp and log once into a buffer that every parameter's
    update reads, where it recomputed ``pow`` (libm's, scalar) for each element of each.
    """
    dtype = _wide(like.device)
    n = count.to(dtype)
    if not isinstance(beta, torch.Tensor):
        if beta > 0:
            return 1 - torch.exp(n * math.log(beta))
        return 1 - torch.pow(torch.tensor(beta, dtype=dtype, device=like.device), n)
    base = beta.to(dtype)  # an injected hyperparameter: exp-log where it is defined
    return 1 - torch.where(base > 0, torch.exp(torch.log(base) * n), torch.pow(base, n))


def _check_state(state_tree: Any, updates: Any, transform: str) -> None:
    check_same_structure(updates, state_tree, f"the state of {transform}")


def _non_negative(owner: str, **values: Any) -> None:
    """Refuses a negative number (tensors and schedules are the caller's to check)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")


def _betas(owner: str, **values: Any) -> None:
    """Refuses a decay rate outside [0, 1)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")


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

    return ElementwiseTransformation(init, update)


def _add(u: torch.Tensor, x: torch.Tensor, in_place: InPlace | None) -> torch.Tensor:
    """``u + x``: into ``u`` where this update made it (``fxtrain.optim.base.owns``)."""
    return u.add_(x) if owns(u, in_place) else own(u + x, in_place)


def _mul(u: torch.Tensor, x: float | torch.Tensor, in_place: InPlace | None) -> torch.Tensor:
    """``u * x``: into ``u`` where this update made it (``fxtrain.optim.base.owns``)."""
    return u.mul_(x) if owns(u, in_place) else own(u * x, in_place)


def _moments(updates, mu, nu, b1, b2):
    """Adam's moments: ``mu <- b1 mu + (1 - b1) g`` and ``nu <- b2 nu + (1 - b2) g^2``."""
    return (tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(b1, g)), mu, updates),
            _ema_of_squares(updates, nu, b2))


def _moments_in_place(updates, mu, nu, b1, b2):
    """``_moments`` written over ``mu`` and ``nu`` (the same operations, so the same bits):
    for a state its caller gives up (``fxtrain.optim.base.InPlace``)."""
    return (tree_map(lambda m, g: m.lerp_(g, 1 - _scalar(b1, g)), mu, updates),
            tree_map(lambda v, g: v.mul_(_scalar(b2, g)).add_(((1 - _scalar(b2, g)) * g).mul_(g)),
                     nu, updates))


def _ema(updates, averages, decay):
    """``avg <- decay avg + (1 - decay) g`` per leaf (optax's first-order update_moment)."""
    return tree_map(lambda m, g: (1 - _scalar(decay, g)) * g + _scalar(decay, g) * m,
                    averages, updates)


def _ema_of_squares(updates, averages, decay):
    """``avg <- decay avg + (1 - decay) g^2`` per leaf (a second moment, as RMSProp keeps)."""
    return tree_map(lambda v, g: v * _scalar(decay, g) + (1 - _scalar(decay, g)) * g * g,
                    averages, updates)


def _per_kind(make: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``make(like)`` made once per device and dtype of the leaves it is asked for (a step's
    bias corrections: 0-d values that every leaf of a kind shares, traced once instead of once
    per parameter, a quarter of a GPT-2 step's graph)."""
    made: dict = {}

    def get(like: torch.Tensor) -> Any:
        kind = (like.device, like.dtype)
        if kind not in made:
            made[kind] = make(like)
        return made[kind]

    return get


def _mu_hat_corrections(b1: float | torch.Tensor, count: torch.Tensor, like: torch.Tensor,
                        nesterov: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """1 - b1^t, and with Nesterov 1 - b1^(t+1), in ``like``'s dtype (see ``_mu_hat``)."""
    bc1 = _bias_correction(b1, count, like).to(like.dtype)
    return bc1, _bias_correction(b1, count + 1, like).to(like.dtype) if nesterov else None


def _mu_hat(m: torch.Tensor, g: torch.Tensor, b1: float | torch.Tensor, count: torch.Tensor,
            nesterov: bool, corrections: tuple | None = None) -> torch.Tensor:
    """m / (1 - b1^t), or with Nesterov b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t);
    ``corrections``: ``_mu_hat_corrections``'s, when the caller made them already."""
    bc1, bc1_next = corrections or _mu_hat_corrections(b1, count, m, nesterov)
    if bc1_next is None:
        return m / bc1
    return _scalar(b1, m) * m / bc1_next + (1 - _scalar(b1, m)) * g / bc1


class ScaleByAdamState(NamedTuple):
    """The state ``scale_by_adam`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_adam(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                  eps: float | torch.Tensor = 1e-8, eps_root: float | torch.Tensor = 0.0, *,
                  nesterov: bool = False) -> GradientTransformation:
    """Adam's direction (Kingma & Ba, 2014), or NAdam's with ``nesterov`` (Dozat, 2016).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    u = m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps), where m_hat = m / (1 - b1^t), or with
    Nesterov m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t) (as optax).

    Examples:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = fx.optim.scale_by_adam()
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> updates["w"], int(state.count)
        (tensor([ 1.0000, -1.0000]), 1)
    """

    def init(params):
        return ScaleByAdamState(_count(params), tree_zeros_like(params), tree_zeros_like(params))

    @in_place_update
    def update(updates, state, params=None, in_place=None):
        del params
        _check_state(state.mu, updates, "scale_by_adam")
        count = state.count + 1
        writes = writable(state, in_place)  # an eager, donated step
        moments = _moments_in_place if writes else _moments
        mu, nu = moments(updates, state.mu, state.nu, b1, b2)

        def corrections(like):
            bc2 = _bias_correction(b2, count, like)
            return (_mu_hat_corrections(b1, count, like, nesterov), bc2.to(like.dtype),
                    torch.sqrt(bc2).to(like.dtype))

        shared = _per_kind(corrections)

        def direction(m, v, g):
            first, bc2, bc2_root = shared(m)
            m_hat = _mu_hat(m, g, b1, count, nesterov, first)
            # sqrt(v_hat + eps_root), written so that eps_root = 0 gives torch's rounding:
            # sqrt(v) / sqrt(1 - b2^t), that square root taken in float64
            v_root = torch.sqrt(v + _scalar(eps_root, v) * bc2) / bc2_root
            return m_hat / (v_root + _scalar(eps, m))

        def direction_in_place(m, v, g):  # the same operations, into two temporaries
            first, bc2, bc2_root = shared(m)
            m_hat = _mu_hat(m, g, b1, count, nesterov, first)
            v_root = (v + _scalar(eps_root, v) * bc2).sqrt_().div_(bc2_root)
            return m_hat.div_(v_root.add_(_scalar(eps, m)))

        if writes:
            return own(tree_map(direction_in_place, mu, nu, updates), in_place), \
                ScaleByAdamState(count, mu, nu)
        return tree_map(direction, mu, nu, updates), ScaleByAdamState(count, mu, nu)

    return ElementwiseTransformation(init, update)


class TraceState(NamedTuple):
    """The state ``trace`` keeps between steps."""

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

    return ElementwiseTransformation(init, update)


class EmaState(NamedTuple):
    """The state ``ema`` keeps between steps."""

    count: torch.Tensor
    ema: Any


def ema(decay: float | torch.Tensor, debias: bool = True,
        accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """An exponential moving average of the updates: e <- decay e + (1 - decay) u; u = e.

    With ``debias`` the output is ``e / (1 - decay^t)``. ``accumulator_dtype`` is the dtype
    ``e`` is stored in (default: the parameters'). ``trace`` sums instead: t <- u + decay t.

    Examples:
        >>> tx = fx.optim.ema(0.5, debias=False)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for g in (4.0, 4.0):
        ...     updates, state = tx.update({"w": torch.tensor([g])}, state)
        ...     print(updates["w"])
        tensor([2.])
        tensor([3.])
    """
    _betas("ema", decay=decay)

    def init(params):
        return EmaState(_count(params), tree_map(
            lambda p: torch.zeros_like(p, dtype=accumulator_dtype or p.dtype), params))

    def update(updates, state, params=None):
        del params
        _check_state(state.ema, updates, "ema")
        count = state.count + 1
        new = _ema(updates, state.ema, decay)
        out = tree_map(lambda e: e / _bias_correction(decay, count, e).to(e.dtype),
                       new) if debias else new
        return out, EmaState(count, tree_map(lambda e, old: e.to(old.dtype), new, state.ema))

    return ElementwiseTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """The state ``scale_by_rms`` keeps between steps."""

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
        nu = _ema_of_squares(updates, state.nu, decay)
        if centered:
            mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(decay, g)), state.mu, updates)
            var = tree_map(lambda v, m: v - m * m, nu, mu)
        else:
            mu, var = None, nu
        out = tree_map(lambda g, v: g / (torch.sqrt(v) + _scalar(eps, g)), updates, var)
        return out, ScaleByRmsState(nu, mu)

    return ElementwiseTransformation(init, update)


class ScaleByLionState(NamedTuple):
    """The state ``scale_by_lion`` keeps between steps."""

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

    return ElementwiseTransformation(init, update)


def _mask_fn(mask: Mask, what: str, tied: Tied = ()) -> Callable[[Mapping], dict[str, bool]]:
    """``selected(params) -> {name: bool}`` for ``mask`` (``fxtrain.optim.masks``, reading the
    ``tied`` names), refusing at once what can never be a mask; None selects every
    parameter."""
    if mask is None:
        return lambda params: dict.fromkeys(params, True)
    check(mask, what)
    return lambda params: by_name(mask, params, what, tied=tied)



def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0,
                        mask: Mask = None) -> GradientTransformation:
    """u -> u + weight_decay * p, for the parameters ``mask(name, p)`` selects (default all).

    ``mask`` is a predicate on the parameter's name and value, a dict of bools by name, optax's
    ``fn(params) -> dict``, or the collection of names that decay (transformers'
    ``get_decay_parameter_names(model)`` as it is); the parameters must then be a flat dict, as
    ``TrainState.params`` is. A mask that does not fit the parameters is refused by ``init``
    (``TrainState.create``), naming the names at fault.

    Examples:
        >>> params = {"weight": torch.tensor([2.0]), "bias": torch.tensor([2.0])}
        >>> tx = fx.optim.add_decayed_weights(0.1, mask=lambda name, p: name == "weight")
        >>> grads = {"weight": torch.tensor([1.0]), "bias": torch.tensor([1.0])}
        >>> tx.update(grads, tx.init(params), params)[0]
        {'weight': tensor([1.2000]), 'bias': tensor([1.])}
    """
    return _add_decayed_weights(weight_decay, mask, ())


def _add_decayed_weights(weight_decay: float | torch.Tensor, mask: Mask,
                         tied: Tied) -> GradientTransformation:
    """``add_decayed_weights`` with its name mask reading the tied names ``tied``."""
    selected = _mask_fn(mask, "the weight decay mask (mask=...)", tied)

    def init(params):
        if mask is not None:
            selected(params)  # a mask that does not fit the parameters fails here, not later
        return None

    @in_place_update
    def update(updates, state, params=None, in_place=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params; call update(grads, state, params)")
        if mask is not None and not isinstance(params, Mapping):
            raise TypeError("add_decayed_weights(mask=...) needs params as a dict of tensors")
        if isinstance(params, Mapping):
            decays = selected(params)
            out = {k: _add(u, _scalar(weight_decay, u) * params[k], in_place) if decays[k] else u
                   for k, u in updates.items()}
        else:
            out = tree_map(lambda u, p: _add(u, _scalar(weight_decay, u) * p, in_place), updates,
                           params)
        return out, state

    # a predicate may read a parameter's shape, which a local shard does not keep
    kind = GradientTransformation if callable(mask) else ElementwiseTransformation
    rebind = (lambda groups: _add_decayed_weights(weight_decay, mask, groups)) \
        if is_names(mask) else None
    return kind(init, update, rebind)


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
    """The state ``scale_by_learning_rate`` keeps between steps."""

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

    @in_place_update
    def update(updates, state, params=None, in_place=None):
        del params
        lr = _rate(learning_rate, state.count)
        out = tree_map(lambda u: _mul(u, sign * _scalar(lr, u), in_place), updates)
        lr_t = lr.to(torch.float32) if isinstance(lr, torch.Tensor) else torch.full_like(
            state.learning_rate, lr)
        return out, ScaleByLearningRateState(state.count + 1, lr_t)

    return ElementwiseTransformation(init, update)


def scale_by_schedule(schedule: Callable[[torch.Tensor], torch.Tensor]) -> GradientTransformation:
    """u -> schedule(count) u, without flipping the sign.

    Examples:
        >>> params = {"w": torch.zeros(1)}
        >>> tx = fx.optim.scale_by_schedule(fx.optim.constant_schedule(0.25))
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init(params))[0]["w"]
        tensor([0.5000])
    """
    return scale_by_learning_rate(schedule, flip_sign=False)


class ScaleByRssState(NamedTuple):
    """The state ``scale_by_rss`` keeps between steps."""

    sum_of_squares: Any


def scale_by_rss(initial_accumulator_value: float | torch.Tensor = 0.1,
                 eps: float | torch.Tensor = 1e-7) -> GradientTransformation:
    """Adagrad's direction (Duchi et al., 2011), as optax's ``scale_by_rss``.

    s <- s + g^2;  u = g / sqrt(s + eps) where s > 0, else 0

    ``torch.optim.Adagrad`` starts ``s`` at 0 and divides by ``sqrt(s) + eps`` (eps 1e-10); this
    keeps optax's start of 0.1 and its eps inside the root.

    Examples:
        >>> tx = fx.optim.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -4.0])}, tx.init(params))
        >>> updates["w"], state.sum_of_squares["w"]
        (tensor([ 1., -1.]), tensor([ 9., 16.]))
    """
    _non_negative("scale_by_rss", initial_accumulator_value=initial_accumulator_value, eps=eps)

    def init(params):
        return ScaleByRssState(tree_map(
            lambda p: torch.full_like(p, float(initial_accumulator_value)), params))

    def update(updates, state, params=None):
        del params
        _check_state(state.sum_of_squares, updates, "scale_by_rss")
        sum_of_squares = tree_map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        out = tree_map(lambda g, s: torch.where(s > 0, g * torch.rsqrt(s + _scalar(eps, s)), 0.0),
                       updates, sum_of_squares)
        return out, ScaleByRssState(sum_of_squares)

    return ElementwiseTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    """The state ``scale_by_adamax`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any  # the decaying infinity norm of the gradients


def scale_by_adamax(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                    eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """Adamax's direction (Kingma & Ba, 2014, section 7): Adam with the infinity norm.

    m <- b1 m + (1 - b1) g;  u_inf <- max(b2 u_inf, |g| + eps);  u = (m / (1 - b1^t)) / u_inf

    Examples:
        >>> tx = fx.optim.scale_by_adamax()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> updates["w"], state.nu["w"]
        (tensor([ 1., -1.]), tensor([0.5000, 2.0000]))
    """
    _betas("scale_by_adamax", b1=b1, b2=b2)
    _non_negative("scale_by_adamax", eps=eps)

    def init(params):
        return ScaleByAdamaxState(_count(params), tree_zeros_like(params), tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_adamax")
        count = state.count + 1
        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - _scalar(b1, g)), state.mu, updates)
        nu = tree_map(lambda u, g: torch.maximum(_scalar(b2, g) * u, g.abs() + _scalar(eps, g)),
                      state.nu, updates)
        out = tree_map(lambda m, u: m / _bias_correction(b1, count, m).to(m.dtype) / u, mu, nu)
        return out, ScaleByAdamaxState(count, mu, nu)

    return ElementwiseTransformation(init, update)


class ScaleByAmsgradState(NamedTuple):
    """The state ``scale_by_amsgrad`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any  # the largest bias-corrected nu seen so far


def scale_by_amsgrad(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                     eps: float | torch.Tensor = 1e-8, eps_root: float | torch.Tensor = 0.0,
                     bias_correction_mu: bool = True,
                     bias_correction_nu: bool = True) -> GradientTransformation:
    """AMSGrad's direction (Reddi et al., 2018): Adam whose denominator never shrinks.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    v_max <- max(v_max, v / (1 - b2^t));  u = (m / (1 - b1^t)) / (sqrt(v_max + eps_root) + eps)

    As optax, the maximum is taken over the bias-corrected ``v``; ``torch.optim.Adam(amsgrad=True)``
    takes it over the raw ``v`` and corrects afterwards, so the two agree only while the corrected
    ``v`` grows (or with ``b2=0``). ``bias_correction_mu`` / ``bias_correction_nu`` turn off the
    division by ``1 - b1^t`` / ``1 - b2^t``.

    Examples:
        >>> tx = fx.optim.scale_by_amsgrad(b2=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for g in (4.0, 1.0):
        ...     updates, state = tx.update({"w": torch.tensor([g])}, state)
        >>> state.nu_max["w"], updates["w"]  # the denominator remembers 4^2
        (tensor([16.]), tensor([0.6053]))
    """
    _betas("scale_by_amsgrad", b1=b1, b2=b2)
    _non_negative("scale_by_amsgrad", eps=eps, eps_root=eps_root)

    def init(params):
        return ScaleByAmsgradState(_count(params), tree_zeros_like(params), tree_zeros_like(params),
                                   tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_amsgrad")
        count = state.count + 1
        mu, nu = _moments(updates, state.mu, state.nu, b1, b2)

        def corrected(beta, enabled):
            return lambda x: x / _bias_correction(beta, count, x).to(x.dtype) if enabled else x

        mu_hat = tree_map(corrected(b1, bias_correction_mu), mu)
        nu_hat = tree_map(corrected(b2, bias_correction_nu), nu)
        nu_max = tree_map(torch.maximum, state.nu_max, nu_hat)
        out = tree_map(lambda m, v: m / (torch.sqrt(v + _scalar(eps_root, v)) + _scalar(eps, m)),
                       mu_hat, nu_max)
        return out, ScaleByAmsgradState(count, mu, nu, nu_max)

    return ElementwiseTransformation(init, update)


class ScaleByRadamState(NamedTuple):
    """The state ``scale_by_radam`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_radam(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                   eps: float | torch.Tensor = 1e-8, eps_root: float | torch.Tensor = 0.0,
                   threshold: float | torch.Tensor = 5.0, *,
                   nesterov: bool = False) -> GradientTransformation:
    """Rectified Adam's direction (Liu et al., 2020).

    rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    r_t = sqrt((rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))
    u = r_t m_hat / (sqrt(v_hat + eps_root) + eps) once rho_t >= threshold, else u = m_hat

    ``torch.optim.RAdam`` divides by ``sqrt(v) + eps`` before the bias correction of ``v``
    (an eps larger by ``1 / sqrt(1 - b2^t)``); this keeps optax's placement.

    Examples:
        >>> tx = fx.optim.scale_by_radam()
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(6):
        ...     updates, state = tx.update({"w": torch.tensor([2.0])}, state)
        ...     print(updates["w"])  # momentum alone until rho_t reaches 5, then rectified
        tensor([2.])
        tensor([2.])
        tensor([2.])
        tensor([2.])
        tensor([2.])
        tensor([0.0258])
    """
    _betas("scale_by_radam", b1=b1, b2=b2)
    _non_negative("scale_by_radam", eps=eps, eps_root=eps_root)

    def init(params):
        return ScaleByRadamState(_count(params), tree_zeros_like(params), tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_radam")
        count = state.count + 1
        mu, nu = _moments(updates, state.mu, state.nu, b1, b2)

        def corrections(like):
            bc2 = _bias_correction(b2, count, like)  # 1 - b2^t, in float64
            t = count.to(bc2.dtype)
            rho_inf = 2 / (1 - _scalar(b2, bc2)) - 1
            rho = rho_inf - 2 * t * (1 - bc2) / bc2
            r = torch.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            return bc2, rho, r, _mu_hat_corrections(b1, count, like, nesterov)

        shared = _per_kind(corrections)

        def direction(m, v, g):
            bc2, rho, r, first = shared(m)
            m_hat = _mu_hat(m, g, b1, count, nesterov, first)
            v_hat = v / bc2.to(v.dtype)
            adam = m_hat / (torch.sqrt(v_hat + _scalar(eps_root, v)) + _scalar(eps, m))
            return torch.where(rho >= threshold, r.to(m.dtype) * adam, m_hat)

        return tree_map(direction, mu, nu, updates), ScaleByRadamState(count, mu, nu)

    return ElementwiseTransformation(init, update)


def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """Clips each element of the updates to [-max_delta, max_delta].

    Examples:
        >>> tx = fx.optim.clip(1.0)
        >>> tx.update({"w": torch.tensor([0.5, -3.0, 2.0])}, tx.init(None))[0]
        {'w': tensor([ 0.5000, -1.0000,  1.0000])}
    """
    _non_negative("clip", max_delta=max_delta)

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return tree_map(lambda u: torch.clamp(u, -_scalar(max_delta, u), _scalar(max_delta, u)),
                        updates), state

    return ElementwiseTransformation(init, update)


class ZeroNansState(NamedTuple):
    """The state ``zero_nans`` keeps between steps."""

    found_nan: Any  # per parameter, a 0-d bool: whether the last update held a NaN


def zero_nans() -> GradientTransformation:
    """Replaces NaNs in the updates with 0, recording per parameter whether it found one.

    Examples:
        >>> tx = fx.optim.zero_nans()
        >>> params = {"w": torch.zeros(2), "b": torch.zeros(1)}
        >>> grads = {"w": torch.tensor([1.0, float("nan")]), "b": torch.tensor([2.0])}
        >>> updates, state = tx.update(grads, tx.init(params))
        >>> updates
        {'w': tensor([1., 0.]), 'b': tensor([2.])}
        >>> state.found_nan
        {'w': tensor(True), 'b': tensor(False)}
    """

    def init(params):
        return ZeroNansState(tree_map(
            lambda p: torch.zeros((), dtype=torch.bool, device=p.device), params))

    def update(updates, state, params=None):
        del state, params  # the state only reports; each update starts afresh
        found_nan = tree_map(lambda u: torch.isnan(u).any(), updates)
        out = tree_map(lambda u: torch.where(torch.isnan(u), torch.zeros_like(u), u), updates)
        return out, ZeroNansState(found_nan)

    return GradientTransformation(init, update)


def scale_by_trust_ratio(min_norm: float | torch.Tensor = 0.0,
                         trust_coefficient: float | torch.Tensor = 1.0,
                         eps: float | torch.Tensor = 0.0) -> GradientTransformation:
    """The layer-wise trust ratio of LARS and LAMB (You et al., 2017; 2020).

    u -> u * trust_coefficient ||p|| / (||u|| + eps), norms at least ``min_norm``, per parameter;
    the ratio is 1 where either norm is 0 (a parameter that would never move otherwise).

    Examples:
        >>> tx = fx.optim.scale_by_trust_ratio()
        >>> params = {"w": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([0.0, 0.5]), "z": torch.tensor([1.0, 1.0])}
        >>> tx.update(grads, tx.init(params), params)[0]  # ||w|| / ||g|| = 5 / 0.5
        {'w': tensor([0., 5.]), 'z': tensor([1., 1.])}
    """
    _non_negative("scale_by_trust_ratio", min_norm=min_norm, trust_coefficient=trust_coefficient,
                  eps=eps)

    def init(params):
        del params
        return None

    def scaled(u, p):
        param_norm = torch.clamp(torch.linalg.vector_norm(p), min=_scalar(min_norm, p))
        update_norm = torch.clamp(torch.linalg.vector_norm(u), min=_scalar(min_norm, u))
        ratio = _scalar(trust_coefficient, p) * param_norm / (update_norm + _scalar(eps, u))
        return u * torch.where((param_norm == 0) | (update_norm == 0), 1.0, ratio).to(u.dtype)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs params; call update(grads, state, params)")
        return tree_map(scaled, updates, params), state

    return GradientTransformation(init, update)
