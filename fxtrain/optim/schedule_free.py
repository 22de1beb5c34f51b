"""Schedule-Free learning (Defazio et al., 2024), with optax.contrib's names and arguments.

Three sequences: z (the base optimizer's iterate), x (an average of the z's, where to evaluate)
and y = (1 - b1) z + b1 x (where gradients are taken). The parameters a step sees, the ones in
``TrainState.params``, are y; the state holds z, and x is worked out from the two by
``schedule_free_eval_params(opt_state, params)``, so the memory is the base optimizer's plus one
copy of the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..tree import first_leaf, tree_map
from .base import GradientTransformation, ScalarOrSchedule, _find_state, chain
from .masks import rebinding, with_tied
from .aliases import sgd
from .schedules import warmup_constant_schedule
from .transforms import (_betas, _bias_correction, _check_state, _count, _ema_of_squares,
                         _non_negative, _scalar, add_decayed_weights, scale_by_learning_rate)


class ScheduleFreeState(NamedTuple):
    """The state ``schedule_free`` keeps between steps."""

    b1: torch.Tensor
    weight_sum: torch.Tensor
    step_count: torch.Tensor  # starts at 1, as optax's; the learning rate is read at it
    max_lr: torch.Tensor
    base_optimizer_state: Any
    z: Any


def _lowest_dtype(params: Any) -> torch.dtype:
    return min((leaf.dtype for leaf in pytree.tree_leaves(params)),
               key=lambda d: torch.finfo(d).bits)


def schedule_free(base_optimizer: GradientTransformation, learning_rate: ScalarOrSchedule,
                  b1: float | torch.Tensor = 0.9, weight_lr_power: float | torch.Tensor = 2.0,
                  state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Makes ``base_optimizer`` schedule-free: its momentum replaced by interpolation and averaging.

    z <- z + base_optimizer(g);  c = lr_max^p / sum of lr_max^p so far (``p`` weight_lr_power);
    x <- (1 - c) x + c z;  y <- b1 x + (1 - b1) z, and the update is y_new - y.

    Turn the base optimizer's own momentum off (``b1=0`` for Adam), and evaluate at
    ``schedule_free_eval_params(opt_state, params)``, not at the params.

    Args:
      base_optimizer: the optimizer that moves z, without momentum.
      learning_rate: the base optimizer's learning rate (a number or schedule, warm-up but no
        decay); it weighs the average. A schedule is read at ``step_count``, from 1.
      b1: the interpolation between x and z; in (0, 1].
      weight_lr_power: the power of the learning rate in the averaging weights.
      state_dtype: the dtype of z (default: the parameters').

    Returns:
      A ``GradientTransformation`` whose state is a ``ScheduleFreeState``.

    Examples:
        >>> params = {"w": torch.tensor([1.0])}
        >>> tx = fx.optim.schedule_free(fx.optim.sgd(0.5), learning_rate=0.5, b1=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        >>> state.z["w"], fx.optim.apply_updates(params, updates)["w"]  # x = z on step 1
        (tensor([0.5000]), tensor([0.5000]))
    """
    if isinstance(b1, (int, float)) and not 0 < b1 <= 1:
        raise ValueError(f"schedule_free: b1 must be in (0, 1], got {b1}")
    _non_negative("schedule_free", learning_rate=learning_rate, weight_lr_power=weight_lr_power)

    def init(params):
        dtype, device = _lowest_dtype(params), first_leaf(params).device
        z = tree_map(lambda p: p.to(state_dtype or p.dtype, copy=True), params)
        zero = torch.zeros((), dtype=dtype, device=device)
        return ScheduleFreeState(torch.as_tensor(b1, dtype=dtype, device=device).clone(),
                                 zero, _count(params) + 1, zero.clone(),
                                 base_optimizer.init(params), z)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("schedule_free needs params; call update(grads, state, params)")
        _check_state(state.z, updates, "schedule_free")
        lr = learning_rate(state.step_count) if callable(learning_rate) else learning_rate
        max_lr = torch.maximum(state.max_lr, torch.as_tensor(lr, dtype=state.max_lr.dtype,
                                                             device=state.max_lr.device))
        weight = max_lr ** weight_lr_power
        total = state.weight_sum + weight
        ck = torch.where(torch.isnan(weight) | torch.isnan(total), torch.nan,
                         torch.nan_to_num(weight / total, nan=0.0, posinf=torch.inf))
        base_updates, base_state = base_optimizer.update(updates, state.base_optimizer_state,
                                                         params)
        z = tree_map(lambda z, u: (z + u).to(z.dtype), state.z, base_updates)

        def step(y, z_old, z_new):
            x = (y - (1 - _scalar(b1, y)) * z_old) / _scalar(b1, y)
            x = (1 - ck.to(y.dtype)) * x + ck.to(y.dtype) * z_new
            return _scalar(b1, y) * x + (1 - _scalar(b1, y)) * z_new - y

        out = tree_map(step, params, state.z, z)
        return out, ScheduleFreeState(state.b1, total, state.step_count + 1, max_lr, base_state, z)

    return GradientTransformation(init, update, rebinding(
        lambda groups: schedule_free(with_tied(base_optimizer, groups), learning_rate, b1,
                                     weight_lr_power, state_dtype), base_optimizer))


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The parameters to evaluate at, x = (y - (1 - b1) z) / b1, from the state and params y.

    Args:
      state: the optimizer state, or any state that holds one ``ScheduleFreeState`` (a chain,
        ``inject_hyperparams``, ``apply_if_finite``), as ``TrainState.opt_state`` does.
      params: the parameters y the steps see (``TrainState.params``).

    Returns:
      x, with the structure of ``params``.

    Examples:
        >>> model = nn.Linear(2, 1)
        >>> state = fx.TrainState.create(model, fx.optim.schedule_free_sgd(0.1))
        >>> state = state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()})
        >>> x = fx.optim.schedule_free_eval_params(state.opt_state, state.params)
        >>> sorted(x) == sorted(state.params)
        True
    """
    found = _find_state(state, ScheduleFreeState)
    if found is None:
        raise ValueError(f"schedule_free_eval_params needs the state of a schedule_free "
                         f"optimizer; got {type(state).__name__}, which holds no "
                         "ScheduleFreeState")
    return tree_map(lambda y, z: (y - (1 - found.b1.to(y.dtype)) * z) / found.b1.to(y.dtype),
                    params, found.z)


def _warmup(learning_rate: ScalarOrSchedule, warmup_steps: int | None) -> ScalarOrSchedule:
    if warmup_steps is None:
        return learning_rate
    return warmup_constant_schedule(0.0, learning_rate, warmup_steps)


def schedule_free_sgd(learning_rate: float | torch.Tensor = 1.0, warmup_steps: int | None = None,
                      b1: float | torch.Tensor = 0.9, weight_decay: float | torch.Tensor | None = None,
                      weight_lr_power: float | torch.Tensor = 2.0,
                      state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Schedule-free SGD: ``schedule_free(sgd(lr), lr)``, optax.contrib's arguments and defaults.

    ``warmup_steps`` warms the rate up linearly from 0; ``weight_decay`` adds ``wd p`` to the
    gradient (scaled by the learning rate, as in torch). Evaluate at
    ``schedule_free_eval_params``.

    Examples:
        >>> params = {"w": torch.tensor([2.0])}
        >>> tx = fx.optim.schedule_free_sgd(0.5)
        >>> updates, _ = tx.update({"w": torch.tensor([1.0])}, tx.init(params), params)
        >>> updates["w"]  # z and x both move by -lr g on the first step
        tensor([-0.5000])
    """
    _non_negative("schedule_free_sgd", learning_rate=learning_rate, weight_decay=weight_decay)
    learning_rate = _warmup(learning_rate, warmup_steps)
    optimizer = sgd(learning_rate)
    if weight_decay is not None:
        optimizer = chain(add_decayed_weights(weight_decay), optimizer)
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)


class ScaleByRmsWithCountState(NamedTuple):
    count: torch.Tensor
    nu: Any


def _scale_by_rms_debiased(decay, eps) -> GradientTransformation:
    """Adam without its first moment: u = g / (sqrt(v / (1 - decay^t)) + eps)."""

    def init(params):
        return ScaleByRmsWithCountState(_count(params), tree_map(torch.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        nu = _ema_of_squares(updates, state.nu, decay)
        out = tree_map(lambda g, v: g / (torch.sqrt(v / _bias_correction(decay, count, v).to(
            v.dtype)) + _scalar(eps, g)), updates, nu)
        return out, ScaleByRmsWithCountState(count, nu)

    return GradientTransformation(init, update)


def schedule_free_adamw(learning_rate: float | torch.Tensor = 0.0025,
                        warmup_steps: int | None = None, b1: float | torch.Tensor = 0.9,
                        b2: float | torch.Tensor = 0.999, eps: float | torch.Tensor = 1e-8,
                        weight_decay: float | torch.Tensor = 0.0,
                        weight_lr_power: float | torch.Tensor = 2.0,
                        state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Schedule-free AdamW, optax.contrib's: AdamW without momentum, made schedule-free.

    The base optimizer is u = g / (sqrt(v / (1 - b2^t)) + eps) + wd p, times -lr (no first
    moment is stored). Evaluate at ``schedule_free_eval_params``.

    Examples:
        >>> params = {"w": torch.tensor([2.0, -1.0])}
        >>> tx = fx.optim.schedule_free_adamw(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(params), params)
        >>> updates["w"]  # -lr sign(g) on the first step
        tensor([-0.1000,  0.1000])
    """
    _non_negative("schedule_free_adamw", learning_rate=learning_rate, eps=eps,
                  weight_decay=weight_decay)
    _betas("schedule_free_adamw", b2=b2)
    learning_rate = _warmup(learning_rate, warmup_steps)
    optimizer = chain(_scale_by_rms_debiased(b2, eps), add_decayed_weights(weight_decay),
                      scale_by_learning_rate(learning_rate))
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)
