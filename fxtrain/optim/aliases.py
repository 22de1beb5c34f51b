"""Popular optimizers, each a ``chain`` of transforms (a catalogue, like optax's alias.py).

Defaults follow ``torch.optim`` so that code ported from it behaves the same.
"""

from __future__ import annotations

import torch

from .base import GradientTransformation, ScalarOrSchedule, chain
from .fused import fused_adam, fused_lion, fused_rmsprop, fused_sgd
from .masks import Tied, is_names
from .transforms import (Mask, _add_decayed_weights, _betas, _mask_fn, _non_negative,
                         add_decayed_weights,
                         scale_by_adam, scale_by_adamax, scale_by_amsgrad, scale_by_learning_rate,
                         scale_by_lion, scale_by_radam, scale_by_rms, scale_by_rss,
                         scale_by_trust_ratio, trace)

Hyper = float | torch.Tensor


def _maybe(enabled: bool, transform: GradientTransformation) -> tuple[GradientTransformation, ...]:
    return (transform,) if enabled else ()


def _nonzero(x: Hyper) -> bool:
    return isinstance(x, torch.Tensor) or x != 0


def sgd(learning_rate: ScalarOrSchedule, momentum: Hyper = 0.0, nesterov: bool = False,
        weight_decay: Hyper = 0.0) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``.

    g <- g + wd p;  t <- g + momentum t;  p <- p - lr (t, or g + momentum t with Nesterov)

    Eager, the step runs ``torch.optim.SGD(foreach=True)``'s operations over lists of leaves
    (``torch._foreach_*``; ``fxtrain.optim.fused``): its bits, within a rounding a sum a step of
    this chain's, which rounds each product before it adds.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> grads = {"w": torch.tensor([0.5, 0.5])}
        >>> tx = fx.optim.sgd(0.1, momentum=0.9)
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params)
        >>> fx.optim.apply_updates(params, updates)
        {'w': tensor([ 0.9500, -2.0500])}
    """
    if nesterov and not _nonzero(momentum):
        raise ValueError("sgd(nesterov=True) needs momentum > 0")
    decays, moves = _nonzero(weight_decay), _nonzero(momentum)
    tx = chain(
        *_maybe(decays, add_decayed_weights(weight_decay)),
        *_maybe(moves, trace(momentum, nesterov)),
        scale_by_learning_rate(learning_rate),
    )
    return tx._replace(fused=fused_sgd(learning_rate, momentum, nesterov, weight_decay,
                                       trace_at=int(decays) if moves else None,
                                       rate_at=int(decays) + int(moves)))


def adam(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
         weight_decay: Hyper = 0.0, *, nesterov: bool = False) -> GradientTransformation:
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam``.

    ``nesterov=True`` gives NAdam (Dozat, 2016) with optax's constant momentum.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.adam(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]  # the first step moves each weight by the learning rate
        tensor([-0.1000,  0.1000])
    """
    decays = _nonzero(weight_decay)
    tx = chain(
        *_maybe(decays, add_decayed_weights(weight_decay)),
        scale_by_adam(b1, b2, eps, nesterov=nesterov),
        scale_by_learning_rate(learning_rate),
    )
    if nesterov:
        return tx
    return tx._replace(fused=fused_adam(learning_rate, b1, b2, eps, weight_decay,
                                        _mask_fn(None, ""), decoupled=False,
                                        adam_at=int(decays), rate_at=int(decays) + 1))


def adamw(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
          weight_decay: Hyper = 1e-2, mask: Mask = None) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    p <- p - lr (adam(g) + wd p); ``mask`` picks the parameters that decay: a predicate
    ``mask(name, p)``, a dict of bools by name, optax's ``mask(params)``, or the names that
    decay (a list such as transformers' ``get_decay_parameter_names(model)``). A mask that does
    not fit the parameters fails in ``TrainState.create``, naming the names at fault.

    Examples:
        >>> params = {"weight": torch.ones(2), "bias": torch.ones(2)}
        >>> tx = fx.optim.adamw(0.1, weight_decay=0.5, mask=lambda name, p: name != "bias")
        >>> grads = {"weight": torch.zeros(2), "bias": torch.zeros(2)}
        >>> updates, _ = tx.update(grads, tx.init(params), params)
        >>> updates  # only the masked-in weight decays: -lr * wd * p
        {'weight': tensor([-0.0500, -0.0500]), 'bias': tensor([-0., -0.])}
    """
    return _adamw(learning_rate, b1, b2, eps, weight_decay, mask, ())


def _adamw(learning_rate: ScalarOrSchedule, b1: Hyper, b2: Hyper, eps: Hyper, weight_decay: Hyper,
           mask: Mask, tied: Tied) -> GradientTransformation:
    """``adamw`` with its name mask reading the tied names ``tied``; eager, it runs fused
    (``fxtrain.optim.fused``)."""
    what = "the weight decay mask (mask=...)"
    tx = chain(
        scale_by_adam(b1, b2, eps),
        _add_decayed_weights(weight_decay, mask, tied),
        scale_by_learning_rate(learning_rate),
    )
    rebind = (lambda groups: _adamw(learning_rate, b1, b2, eps, weight_decay, mask, groups)) \
        if tx.with_tied is not None else None
    return tx._replace(with_tied=rebind, fused=fused_adam(
        learning_rate, b1, b2, eps, weight_decay, _mask_fn(mask, what, tied), decoupled=True,
        adam_at=0, rate_at=2))


def lion(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.99,
         weight_decay: Hyper = 0.0, mask: Mask = None) -> GradientTransformation:
    """Lion: p <- p - lr (sign(b1 m + (1 - b1) g) + wd p). Use a 3-10x smaller lr than AdamW.

    Eager, the step runs over lists of leaves (``torch._foreach_*``; ``fxtrain.optim.fused``),
    each ``a + x b`` one fused multiply-add: within a rounding a sum a step of this chain's.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.lion(0.01)
        >>> updates, _ = tx.update({"w": torch.tensor([0.3, -0.001])}, tx.init(params), params)
        >>> updates["w"]  # the sign of the interpolated gradient, times -lr
        tensor([-0.0100,  0.0100])
    """
    return _lion(learning_rate, b1, b2, weight_decay, mask, ())


def _lion(learning_rate: ScalarOrSchedule, b1: Hyper, b2: Hyper, weight_decay: Hyper,
          mask: Mask, tied: Tied) -> GradientTransformation:
    """``lion`` with its name mask reading the tied names ``tied`` (kept fused when
    ``TrainState.create`` rebinds it to a model's tied names)."""
    decays = _nonzero(weight_decay)
    tx = chain(
        scale_by_lion(b1, b2),
        *_maybe(decays, _add_decayed_weights(weight_decay, mask, tied)),
        scale_by_learning_rate(learning_rate),
    )
    rebind = (lambda groups: _lion(learning_rate, b1, b2, weight_decay, mask, groups)) \
        if tx.with_tied is not None else None
    selected = _mask_fn(mask, "the weight decay mask (mask=...)", tied) if decays else \
        _mask_fn(None, "")
    return tx._replace(with_tied=rebind, fused=fused_lion(
        learning_rate, b1, b2, weight_decay, selected, lion_at=0, rate_at=1 + int(decays)))


def rmsprop(learning_rate: ScalarOrSchedule, decay: Hyper = 0.99, eps: Hyper = 1e-8,
            momentum: Hyper = 0.0, centered: bool = False,
            weight_decay: Hyper = 0.0) -> GradientTransformation:
    """RMSprop as ``torch.optim.RMSprop`` (``decay`` is its ``alpha``).

    Eager, the step runs ``torch.optim.RMSprop(foreach=True)``'s operations over lists of
    leaves (``torch._foreach_*``; ``fxtrain.optim.fused``): its bits, within a few roundings a
    step of this chain's.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.rmsprop(0.01, decay=0.9)
        >>> updates, _ = tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(params), params)
        >>> updates["w"]
        tensor([-0.0316,  0.0316])
    """
    decays, moves = _nonzero(weight_decay), _nonzero(momentum)
    tx = chain(
        *_maybe(decays, add_decayed_weights(weight_decay)),
        scale_by_rms(decay, eps, centered),
        *_maybe(moves, trace(momentum)),
        scale_by_learning_rate(learning_rate),
    )
    return tx._replace(fused=fused_rmsprop(
        learning_rate, decay, eps, momentum, centered, weight_decay, rms_at=int(decays),
        trace_at=int(decays) + 1 if moves else None, rate_at=int(decays) + 1 + int(moves)))


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: Hyper = 0.1,
            eps: Hyper = 1e-7) -> GradientTransformation:
    """Adagrad (Duchi et al., 2011): p <- p - lr g / sqrt(sum of g^2 + eps).

    optax's defaults and maths: the sum starts at 0.1 and eps sits inside the root;
    ``torch.optim.Adagrad`` starts at 0 and uses ``sqrt(sum) + 1e-10`` (and has ``lr_decay``).

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]  # the first step moves each weight by the learning rate
        tensor([-0.1000,  0.1000])
        >>> fx.optim.adagrad(-0.1)
        Traceback (most recent call last):
            ...
        ValueError: adagrad: learning_rate must be >= 0, got -0.1
    """
    _non_negative("adagrad", learning_rate=learning_rate,
                  initial_accumulator_value=initial_accumulator_value, eps=eps)
    return chain(scale_by_rss(initial_accumulator_value, eps),
                 scale_by_learning_rate(learning_rate))


def adamax(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
           eps: Hyper = 1e-8) -> GradientTransformation:
    """Adamax (Kingma & Ba, 2014): p <- p - lr (m / (1 - b1^t)) / max(b2 u, |g| + eps).

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.adamax(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]
        tensor([-0.1000,  0.1000])
    """
    _non_negative("adamax", learning_rate=learning_rate, eps=eps)
    _betas("adamax", b1=b1, b2=b2)
    return chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))


def amsgrad(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999,
            eps: Hyper = 1e-8, eps_root: Hyper = 0.0, bias_correction_mu: bool = True,
            bias_correction_nu: bool = True) -> GradientTransformation:
    """AMSGrad (Reddi et al., 2018): Adam over the running maximum of the corrected ``v``.

    optax's maths: the maximum is of ``v / (1 - b2^t)``, where ``torch.optim.Adam(amsgrad=True)``
    takes the maximum of ``v`` (see ``scale_by_amsgrad``).

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.amsgrad(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]
        tensor([-0.1000,  0.1000])
    """
    _non_negative("amsgrad", learning_rate=learning_rate, eps=eps, eps_root=eps_root)
    _betas("amsgrad", b1=b1, b2=b2)
    return chain(scale_by_amsgrad(b1, b2, eps, eps_root, bias_correction_mu, bias_correction_nu),
                 scale_by_learning_rate(learning_rate))


def nadamw(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
           eps_root: Hyper = 0.0, weight_decay: Hyper = 1e-4, mask: Mask = None, *,
           nesterov: bool = True) -> GradientTransformation:
    """NAdamW (Dozat, 2016; Loshchilov & Hutter, 2019): p <- p - lr (nadam(g) + wd p).

    optax's default weight decay (1e-4) and constant momentum; ``torch.optim.NAdam`` decays
    nothing by default and warms its momentum up (``momentum_decay``).

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.nadamw(0.1, weight_decay=0.0)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]  # the look-ahead makes the first step 1 + b1 / (1 + b1) times Adam's
        tensor([-0.1474,  0.1474])
    """
    _non_negative("nadamw", learning_rate=learning_rate, eps=eps, eps_root=eps_root,
                  weight_decay=weight_decay)
    _betas("nadamw", b1=b1, b2=b2)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def radam(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
          eps_root: Hyper = 0.0, threshold: Hyper = 5.0, *,
          nesterov: bool = False) -> GradientTransformation:
    """RAdam (Liu et al., 2020): Adam whose adaptive step is rectified while ``v`` is uncertain.

    Examples:
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = fx.optim.radam(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]  # the first steps are momentum SGD
        tensor([-0.0500,  0.3000])
    """
    _non_negative("radam", learning_rate=learning_rate, eps=eps, eps_root=eps_root)
    _betas("radam", b1=b1, b2=b2)
    return chain(scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def lamb(learning_rate: ScalarOrSchedule, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-6,
         eps_root: Hyper = 0.0, weight_decay: Hyper = 0.0,
         mask: Mask = None) -> GradientTransformation:
    """LAMB (You et al., 2020): AdamW's step, rescaled per parameter by ||p|| / ||step||.

    p <- p - lr ||p|| / ||r|| r, where r = adam(g) + wd p; ``mask(name, p)`` picks the
    parameters that decay.

    Examples:
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> tx = fx.optim.lamb(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> updates["w"]  # Adam's first step [1, -1], scaled to lr * ||p|| = 0.5
        tensor([-0.3536,  0.3536])
    """
    _non_negative("lamb", learning_rate=learning_rate, eps=eps, eps_root=eps_root,
                  weight_decay=weight_decay)
    _betas("lamb", b1=b1, b2=b2)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


def _only_where(mask: Mask, transform: GradientTransformation,
                tied: Tied = ()) -> GradientTransformation:
    """A stateless ``transform`` applied to the parameters ``mask`` selects (as ``adamw``'s),
    the mask reading the tied names ``tied``."""
    selected = _mask_fn(mask, "lars(trust_ratio_mask=...)", tied)

    def init(params):
        selected(params)  # a mask that does not fit the parameters fails here
        return transform.init(params)

    def update(updates, state, params=None):
        changed, state = transform.update(updates, state, params)
        chosen = selected(params)
        return {k: changed[k] if chosen[k] else u for k, u in updates.items()}, state

    rebind = (lambda groups: _only_where(mask, transform, groups)) if is_names(mask) else None
    return GradientTransformation(init, update, rebind)


def lars(learning_rate: ScalarOrSchedule, weight_decay: Hyper = 0.0,
         weight_decay_mask: Mask | bool = True, trust_coefficient: Hyper = 0.001,
         eps: Hyper = 0.0, trust_ratio_mask: Mask | bool = True, momentum: Hyper = 0.9,
         nesterov: bool = False) -> GradientTransformation:
    """LARS (You et al., 2017): momentum SGD on layer-wise rescaled steps.

    r = g + wd p;  t <- -lr trust_coefficient ||p|| / ||r|| r + momentum t;  p <- p + t

    Each mask is ``True`` (every parameter, optax's default) or, as in ``adamw``, a predicate
    ``mask(name, p)`` or a dict of bools by name.

    Examples:
        >>> params = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
        >>> tx = fx.optim.lars(1.0, trust_ratio_mask=lambda name, p: name != "b")
        >>> grads = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.5])}
        >>> tx.update(grads, tx.init(params), params)[0]  # w: -0.001 * 5 / 1; b: plain SGD
        {'w': tensor([ 0.0000, -0.0050]), 'b': tensor([-0.5000])}
    """
    _non_negative("lars", learning_rate=learning_rate, weight_decay=weight_decay,
                  trust_coefficient=trust_coefficient, eps=eps, momentum=momentum)
    decay_mask = None if weight_decay_mask is True else weight_decay_mask
    trust_ratio = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    return chain(
        add_decayed_weights(weight_decay, decay_mask),
        trust_ratio if trust_ratio_mask is True else _only_where(trust_ratio_mask, trust_ratio),
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov),
    )
