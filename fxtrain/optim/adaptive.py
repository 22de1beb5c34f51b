"""More of optax's optimizers, under optax's names and arguments, equal to optax's in float64:
AdaBelief, Yogi, AdaDelta, signSGD, Fromage, optimistic gradient descent, AdamaxW, NAdam, Rprop,
NovoGrad and Adan, with the transforms they are chains of.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..tree import tree_map, tree_zeros_like
from .base import GradientTransformation, ScalarOrSchedule, chain
from .masks import Mask
from .transforms import (ScaleByAdamState, _betas, _bias_correction, _check_state, _count,
                         _ema, _mu_hat,
                         _non_negative, _scalar, add_decayed_weights, scale, scale_by_adam,
                         scale_by_adamax, scale_by_learning_rate, scale_by_trust_ratio)

Hyper = float | torch.Tensor


class ScaleByBeliefState(NamedTuple):
    """The state ``scale_by_belief`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_belief(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-16,
                    eps_root: Hyper = 1e-16, *, nesterov: bool = False) -> GradientTransformation:
    """AdaBelief's direction (Zhuang et al., 2020): Adam's, with the second moment of the
    gradient's deviation from its mean, s <- b2 s + (1 - b2) (g - m)^2 + eps_root.

    Examples:
        >>> tx = fx.optim.scale_by_belief()
        >>> params = {"w": torch.zeros(2)}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> int(state.count), updates["w"].sign()
        (1, tensor([ 1., -1.]))
    """
    _betas("scale_by_belief", b1=b1, b2=b2)
    _non_negative("scale_by_belief", eps=eps, eps_root=eps_root)

    def init(params):
        return ScaleByBeliefState(_count(params), tree_zeros_like(params), tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_belief")
        count = state.count + 1
        mu = _ema(updates, state.mu, b1)
        nu = tree_map(lambda s, g, m: _scalar(b2, s) * s + (1 - _scalar(b2, s)) * (g - m) ** 2
                      + _scalar(eps_root, s), state.nu, updates, mu)

        def direction(m, s, g):
            s_hat = s / _bias_correction(b2, count, s).to(s.dtype)
            return _mu_hat(m, g, b1, count, nesterov) / (torch.sqrt(s_hat) + _scalar(eps, m))

        return tree_map(direction, mu, nu, updates), ScaleByBeliefState(count, mu, nu)

    return GradientTransformation(init, update)


def adabelief(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
              eps: Hyper = 1e-16, eps_root: Hyper = 1e-16, *,
              nesterov: bool = False) -> GradientTransformation:
    """AdaBelief (Zhuang et al., 2020), as optax's.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.adabelief(0.1)
        >>> tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)[0]["w"]
        tensor([-0.1111,  0.1111])
    """
    _non_negative("adabelief", learning_rate=learning_rate)
    return chain(scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def scale_by_yogi(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-3, eps_root: Hyper = 0.0,
                  initial_accumulator_value: float = 1e-6) -> GradientTransformation:
    """Yogi's direction (Zaheer et al., 2018): Adam's, with an additive second moment,
    v <- v - (1 - b2) sign(v - g^2) g^2; both moments start at ``initial_accumulator_value``.
    Its state is Adam's (``ScaleByAdamState``), as in optax."""
    _betas("scale_by_yogi", b1=b1, b2=b2)
    _non_negative("scale_by_yogi", eps=eps, eps_root=eps_root,
                  initial_accumulator_value=initial_accumulator_value)

    def init(params):
        def full():
            return tree_map(lambda p: torch.full_like(p, initial_accumulator_value), params)

        return ScaleByAdamState(_count(params), full(), full())

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_yogi")
        count = state.count + 1
        mu = _ema(updates, state.mu, b1)
        nu = tree_map(lambda v, g: v - (1 - _scalar(b2, v)) * torch.sign(v - g * g) * g * g,
                      state.nu, updates)

        def direction(m, v):
            m_hat = m / _bias_correction(b1, count, m).to(m.dtype)
            v_hat = v / _bias_correction(b2, count, v).to(v.dtype)
            return m_hat / (torch.sqrt(v_hat + _scalar(eps_root, v)) + _scalar(eps, m))

        return tree_map(direction, mu, nu), ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def yogi(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
         eps: Hyper = 1e-3) -> GradientTransformation:
    """Yogi (Zaheer et al., 2018), as optax's."""
    _non_negative("yogi", learning_rate=learning_rate)
    return chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))


class ScaleByAdaDeltaState(NamedTuple):
    """The state ``scale_by_adadelta`` keeps between steps."""

    e_g: Any
    e_x: Any


def scale_by_adadelta(rho: Hyper = 0.9, eps: Hyper = 1e-6) -> GradientTransformation:
    """AdaDelta's direction (Zeiler, 2012): u = sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) g."""
    _betas("scale_by_adadelta", rho=rho)
    _non_negative("scale_by_adadelta", eps=eps)

    def init(params):
        return ScaleByAdaDeltaState(tree_zeros_like(params), tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.e_g, updates, "scale_by_adadelta")
        e_g = tree_map(lambda e, g: _scalar(rho, e) * e + (1 - _scalar(rho, e)) * g * g,
                       state.e_g, updates)
        out = tree_map(lambda g, eg, ex: torch.sqrt(ex + _scalar(eps, g))
                       / torch.sqrt(eg + _scalar(eps, g)) * g, updates, e_g, state.e_x)
        e_x = tree_map(lambda e, u: _scalar(rho, e) * e + (1 - _scalar(rho, e)) * u * u,
                       state.e_x, out)
        return out, ScaleByAdaDeltaState(e_g, e_x)

    return GradientTransformation(init, update)


def adadelta(learning_rate: ScalarOrSchedule | None = None, rho: Hyper = 0.9, eps: Hyper = 1e-6,
             weight_decay: Hyper = 0.0, weight_decay_mask: Mask = None) -> GradientTransformation:
    """AdaDelta (Zeiler, 2012), as optax's (``learning_rate=None``: no scaling, the rule's own
    step; with one, torch.optim.Adadelta's ``lr``)."""
    _non_negative("adadelta", weight_decay=weight_decay)
    return chain(add_decayed_weights(weight_decay, weight_decay_mask),
                 scale_by_adadelta(rho, eps),
                 scale_by_learning_rate(1.0 if learning_rate is None else learning_rate))


def scale_by_sign() -> GradientTransformation:
    """u -> sign(u)."""

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return tree_map(torch.sign, updates), state

    return GradientTransformation(init, update)


def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """signSGD (Bernstein et al., 2018): p <- p - lr sign(g), as optax's.

    Examples:
        >>> tx = fx.optim.sign_sgd(0.1)
        >>> grads = {"w": torch.tensor([3.0, -0.2, 0.0])}
        >>> tx.update(grads, tx.init(grads))[0]["w"]
        tensor([-0.1000,  0.1000, -0.0000])
    """
    _non_negative("sign_sgd", learning_rate=learning_rate)
    return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))


def fromage(learning_rate: float, min_norm: float = 1e-6) -> GradientTransformation:
    """Fromage (Bernstein et al., 2020): a step of relative size ``learning_rate`` per tensor,
    then the weights shrunk by 1 / sqrt(1 + lr^2), as optax's (a float learning rate)."""
    if not isinstance(learning_rate, (int, float)):
        raise TypeError("fromage: learning_rate must be a float (a schedule would change the "
                        "shrinking of the weights each step; optax's schedule form is not here)")
    _non_negative("fromage", learning_rate=learning_rate, min_norm=min_norm)
    mult = 1 / (1 + learning_rate**2) ** 0.5
    return chain(scale_by_trust_ratio(min_norm), scale_by_learning_rate(learning_rate * mult),
                 add_decayed_weights(mult - 1))


class ScaleByOptimisticGradientState(NamedTuple):
    """The state ``scale_by_optimistic_gradient`` keeps between steps."""

    is_initial_step: torch.Tensor
    previous_gradient: Any


def scale_by_optimistic_gradient(alpha: Hyper = 1.0, beta: Hyper = 1.0) -> GradientTransformation:
    """u = (alpha + beta) g - beta g_prev (the first step's g_prev is g itself)."""

    def init(params):
        return ScaleByOptimisticGradientState(
            torch.ones((), dtype=torch.bool, device=_count(params).device),
            tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.previous_gradient, updates, "scale_by_optimistic_gradient")
        first = state.is_initial_step

        def step(g, prev):
            prev = torch.where(first, g, prev)
            return (_scalar(alpha, g) + _scalar(beta, g)) * g - _scalar(beta, g) * prev

        return tree_map(step, updates, state.previous_gradient), ScaleByOptimisticGradientState(
            torch.zeros_like(first), updates)

    return GradientTransformation(init, update)


def optimistic_gradient_descent(learning_rate: ScalarOrSchedule, alpha: Hyper = 1.0,
                                beta: Hyper = 1.0) -> GradientTransformation:
    """Optimistic gradient descent (Mokhtari et al., 2019), for min-max games, as optax's."""
    _non_negative("optimistic_gradient_descent", learning_rate=learning_rate)
    return chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))


def adamaxw(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
            eps: Hyper = 1e-8, weight_decay: Hyper = 1e-4, mask: Mask = None
            ) -> GradientTransformation:
    """Adamax with decoupled weight decay, as optax's."""
    _non_negative("adamaxw", learning_rate=learning_rate, weight_decay=weight_decay)
    return chain(scale_by_adamax(b1, b2, eps), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


def nadam(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
          eps: Hyper = 1e-8, eps_root: Hyper = 0.0) -> GradientTransformation:
    """NAdam (Dozat, 2016), optax's ``adam(..., nesterov=True)``."""
    _non_negative("nadam", learning_rate=learning_rate)
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=True),
                 scale_by_learning_rate(learning_rate))


class ScaleByRpropState(NamedTuple):
    """The state ``scale_by_rprop`` keeps between steps."""

    step_sizes: Any
    prev_updates: Any


def scale_by_rprop(learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2,
                   min_step_size: float = 1e-6, max_step_size: float = 50.0
                   ) -> GradientTransformation:
    """Rprop's step (Riedmiller & Braun, 1993), as optax's: a step size per weight, grown by
    ``eta_plus`` while the gradient keeps its sign and shrunk by ``eta_minus`` when it flips
    (that step then taken back to zero), clipped to [min_step_size, max_step_size]. As in
    optax, each call returns the step the previous call recorded (the first call returns zeros),
    so runs match optax's step for step."""
    _non_negative("scale_by_rprop", learning_rate=learning_rate, eta_minus=eta_minus,
                  eta_plus=eta_plus, min_step_size=min_step_size, max_step_size=max_step_size)

    def init(params):
        return ScaleByRpropState(tree_map(lambda p: torch.full_like(p, learning_rate), params),
                                 tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.step_sizes, updates, "scale_by_rprop")
        sign = tree_map(lambda g, prev: g * prev, updates, state.prev_updates)
        sizes = tree_map(lambda s, size: torch.where(
            s == 0, size, torch.clamp(size * torch.where(s > 0, eta_plus, eta_minus),
                                      min_step_size, max_step_size)), sign, state.step_sizes)
        prev = tree_map(lambda s, g, size: torch.where(s < 0, torch.zeros_like(g),
                                                       size * torch.sign(g)),
                        sign, updates, sizes)
        # as optax computes it: the step the last update recorded, zero where the sign flipped
        out = tree_map(lambda s, old: torch.where(s < 0, torch.zeros_like(old), old),
                       sign, state.prev_updates)
        return out, ScaleByRpropState(sizes, prev)

    return GradientTransformation(init, update)


def rprop(learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2,
          min_step_size: float = 1e-6, max_step_size: float = 50.0) -> GradientTransformation:
    """Rprop (Riedmiller & Braun, 1993), as optax's (``learning_rate``: the first step size)."""
    return chain(scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size,
                                max_step_size), scale(-1.0))


class ScaleByNovogradState(NamedTuple):
    """The state ``scale_by_novograd`` keeps between steps."""

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_novograd(b1: Hyper = 0.9, b2: Hyper = 0.25, eps: Hyper = 1e-8,
                      eps_root: Hyper = 0.0, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """NovoGrad's direction (Ginsburg et al., 2019), as optax's: a second moment per tensor (of
    its gradient's squared norm), the gradient normalised by it plus weight decay, and momentum
    over that; the first step starts both from the gradient itself."""
    _betas("scale_by_novograd", b1=b1, b2=b2)
    _non_negative("scale_by_novograd", eps=eps, eps_root=eps_root, weight_decay=weight_decay)

    def init(params):
        return ScaleByNovogradState(_count(params), tree_zeros_like(params),
                                    tree_map(lambda p: torch.zeros((), dtype=p.dtype,
                                                                   device=p.device), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_novograd needs params; call update(grads, state, params)")
        _check_state(state.mu, updates, "scale_by_novograd")
        count = state.count + 1
        first = count == 1
        nu = tree_map(lambda g, n: torch.where(
            first, (g * g).sum(), _scalar(b2, n) * n + (1 - _scalar(b2, n)) * (g * g).sum()),
            updates, state.nu)
        mu = tree_map(lambda g, p, n, m: torch.where(
            first, 0.0, _scalar(b1, m) * m) + g / (torch.sqrt(n + _scalar(eps_root, n))
                                                   + _scalar(eps, g))
            + _scalar(weight_decay, p) * p, updates, params, nu, state.mu)
        return mu, ScaleByNovogradState(count, mu, nu)

    return GradientTransformation(init, update)


def novograd(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.25,
             eps: Hyper = 1e-6, eps_root: Hyper = 0.0,
             weight_decay: Hyper = 0.0) -> GradientTransformation:
    """NovoGrad (Ginsburg et al., 2019), as optax's."""
    _non_negative("novograd", learning_rate=learning_rate)
    return chain(scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
                 scale_by_learning_rate(learning_rate))


class ScaleByAdanState(NamedTuple):
    """The state ``scale_by_adan`` keeps between steps."""

    m: Any
    v: Any
    n: Any
    g: Any
    t: torch.Tensor


def scale_by_adan(b1: Hyper = 0.98, b2: Hyper = 0.92, b3: Hyper = 0.99, eps: Hyper = 1e-8,
                  eps_root: Hyper = 0.0) -> GradientTransformation:
    """Adan's direction (Xie et al., 2022), as optax's: moments of the gradient, of its change
    since the last step, and of the squared Nesterov-style estimate g + (1 - b2) (g - g_prev)."""
    _betas("scale_by_adan", b1=b1, b2=b2, b3=b3)
    _non_negative("scale_by_adan", eps=eps, eps_root=eps_root)

    def init(params):
        zeros = [tree_zeros_like(params) for _ in range(4)]
        return ScaleByAdanState(*zeros, _count(params))

    def update(updates, state, params=None):
        del params
        _check_state(state.m, updates, "scale_by_adan")
        diff = tree_map(lambda g, prev: torch.where(state.t == 0, torch.zeros_like(g), g - prev),
                        updates, state.g)
        m, v = _ema(updates, state.m, b1), _ema(diff, state.v, b2)
        n = tree_map(lambda acc, g, d: (1 - _scalar(b3, acc)) * (g + (1 - _scalar(b2, g)) * d)
                     ** 2 + _scalar(b3, acc) * acc, state.n, updates, diff)
        t = state.t + 1

        def direction(m_, v_, n_):
            m_hat = m_ / _bias_correction(b1, t, m_).to(m_.dtype)
            v_hat = v_ / _bias_correction(b2, t, v_).to(v_.dtype)
            n_hat = n_ / _bias_correction(b3, t, n_).to(n_.dtype)
            return (m_hat + (1 - _scalar(b2, m_)) * v_hat) / (
                torch.sqrt(n_hat + _scalar(eps_root, n_)) + _scalar(eps, m_))

        return tree_map(direction, m, v, n), ScaleByAdanState(m, v, n, updates, t)

    return GradientTransformation(init, update)


def adan(learning_rate: ScalarOrSchedule, b1: Hyper = 0.98, b2: Hyper = 0.92, b3: Hyper = 0.99,
         eps: Hyper = 1e-8, eps_root: Hyper = 1e-8, weight_decay: Hyper = 0.0,
         mask: Mask = None) -> GradientTransformation:
    """Adan (Xie et al., 2022), as optax's."""
    _non_negative("adan", learning_rate=learning_rate, weight_decay=weight_decay)
    return chain(scale_by_adan(b1, b2, b3, eps, eps_root), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))
