"""Adafactor (Shazeer & Stern, 2018): Adam's second moment, stored as row and column averages.

For a matrix gradient G (n x m) the second moment V (n x m) is kept as its row means R (n) and
column means C (m), and estimated as V ~ R C^T / mean(R): memory n + m instead of n m.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from ..tree import tree_map
from .base import GradientTransformation, ScalarOrSchedule, chain
from .blocks import clip_by_block_rms, scale_by_param_block_rms
from .transforms import (Mask, _acc_dtype, _count, _non_negative, _scalar, add_decayed_weights,
                         ema, scale, scale_by_learning_rate)


class FactoredState(NamedTuple):
    """The state ``factored`` keeps between steps."""

    count: torch.Tensor
    v_row: Any  # per factored parameter: the mean of g^2 over its largest axis; else zeros(1)
    v_col: Any  # per factored parameter: over its second largest axis; else zeros(1)
    v: Any      # per parameter that is not factored: the average of g^2; else zeros(1)


def _decay_rate_pow(i: torch.Tensor, exponent: float | torch.Tensor = 0.8) -> torch.Tensor:
    """Adafactor's second-moment decay at step ``i`` (from 0): 1 - (i + 1)^-exponent.

    In float32, as optax (``torch.optim.Adafactor`` takes it in float64: a difference of
    about 1e-8 after 60 steps in float64).
    """
    return 1.0 - (i + 1).to(torch.float32) ** (-exponent)


def _factored_dims(shape: torch.Size, factored: bool,
                   min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The second largest and the largest axis, or None when the tensor is not factored."""
    if not factored or len(shape) < 2:
        return None
    # stable, as numpy's argsort in optax for up to 16 axes, so that ties pick the same axes
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def scale_by_factored_rms(factored: bool = True, decay_rate: float | torch.Tensor = 0.8,
                          step_offset: int | torch.Tensor = 0, min_dim_size_to_factor: int = 128,
                          epsilon: float | torch.Tensor = 1e-30,
                          decay_rate_fn: Callable = _decay_rate_pow) -> GradientTransformation:
    """Divides by a factored estimate of the gradient's root mean square (Adafactor's core).

    beta_t = decay_rate_fn(t - step_offset, decay_rate) = 1 - (t + 1)^-decay_rate (t from 0);
    for a tensor whose two largest axes are both >= ``min_dim_size_to_factor``:
    R <- beta_t R + (1 - beta_t) mean_cols(g^2 + eps); C likewise over the rows;
    u = g / sqrt(R C^T / mean(R)). Other tensors keep v <- beta_t v + (1 - beta_t) (g^2 + eps)
    and u = g / sqrt(v). The state's shapes are optax's (``zeros(1)`` where a tree is unused).

    Args:
      factored: whether to factor tensors of rank >= 2.
      decay_rate: the exponent of the decay schedule.
      step_offset: the step the decay schedule starts from (for fine-tuning).
      min_dim_size_to_factor: factor only tensors whose two largest axes are at least this.
      epsilon: added to g^2.
      decay_rate_fn: ``fn(step, decay_rate) -> beta_t``, a tensor function of the step.

    Returns:
      A ``GradientTransformation`` whose state is a ``FactoredState``; ``update`` needs params.

    Examples:
        >>> tx = fx.optim.scale_by_factored_rms(min_dim_size_to_factor=2)
        >>> params = {"w": torch.zeros(2, 3)}
        >>> state = tx.init(params)
        >>> state.v_row["w"].shape, state.v_col["w"].shape  # 2 + 3 numbers for 6 weights
        (torch.Size([2]), torch.Size([3]))
        >>> updates, state = tx.update({"w": torch.full((2, 3), 4.0)}, state, params)
        >>> updates["w"]
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    _non_negative("scale_by_factored_rms", decay_rate=decay_rate, epsilon=epsilon)
    if min_dim_size_to_factor < 1:
        raise ValueError(f"scale_by_factored_rms: min_dim_size_to_factor must be >= 1, got "
                         f"{min_dim_size_to_factor}")

    def dims(p):
        return _factored_dims(p.shape, factored, min_dim_size_to_factor)

    def init(params):
        def unused(p):
            return torch.zeros(1, dtype=p.dtype, device=p.device)

        def v_row(p):  # the axis d0 removed
            return unused(p) if dims(p) is None else torch.zeros_like(p).sum(dims(p)[1])

        def v_col(p):  # the axis d1 removed
            return unused(p) if dims(p) is None else torch.zeros_like(p).sum(dims(p)[0])

        return FactoredState(_count(params), tree_map(v_row, params), tree_map(v_col, params),
                             tree_map(lambda p: torch.zeros_like(p) if dims(p) is None
                                      else unused(p), params))

    def one(g, v_row, v_col, v, p, beta):
        beta = beta.to(_acc_dtype(g))
        grad_sqr = g * g + _scalar(epsilon, g)
        if dims(p) is None:
            v = (beta * v + (1 - beta) * grad_sqr).to(p.dtype)
            return g * torch.rsqrt(v), v_row, v_col, v
        d1, d0 = dims(p)
        v_row = (beta * v_row + (1 - beta) * grad_sqr.mean(d0)).to(p.dtype)
        v_col = (beta * v_col + (1 - beta) * grad_sqr.mean(d1)).to(p.dtype)
        row_mean = v_row.mean(d1 - 1 if d1 > d0 else d1, keepdim=True)
        row_factor = torch.rsqrt(v_row / row_mean)
        return g * row_factor.unsqueeze(d0) * torch.rsqrt(v_col).unsqueeze(d1), v_row, v_col, v

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params; call update(grads, state, "
                             "params)")
        beta = decay_rate_fn(state.count - step_offset, decay_rate)
        leaves, spec = pytree.tree_flatten(updates)
        if pytree.tree_structure(state.v) != spec:
            raise ValueError("the state of scale_by_factored_rms does not match the updates' "
                             "tree; was it made by another optimizer?")
        trees = (state.v_row, state.v_col, state.v, params)
        out = [one(*args, beta) for args in zip(leaves, *map(pytree.tree_leaves, trees))]
        new_u, v_row, v_col, v = (pytree.tree_unflatten(list(column), spec) for column in zip(*out))
        return new_u, FactoredState(state.count + 1, v_row, v_col, v)

    return GradientTransformation(init, update)


def adafactor(learning_rate: ScalarOrSchedule | None = None, min_dim_size_to_factor: int = 128,
              decay_rate: float | torch.Tensor = 0.8, decay_offset: int | torch.Tensor = 0,
              multiply_by_parameter_scale: bool = True,
              clipping_threshold: float | torch.Tensor | None = 1.0,
              momentum: float | torch.Tensor | None = None,
              dtype_momentum: torch.dtype = torch.float32,
              weight_decay_rate: float | torch.Tensor | None = None,
              eps: float | torch.Tensor = 1e-30, factored: bool = True,
              weight_decay_mask: Mask = None) -> GradientTransformation:
    """Adafactor (Shazeer & Stern, 2018), as optax's ``adafactor`` (its arguments and defaults).

    u = scale_by_factored_rms(g); u <- u / max(1, rms(u) / clipping_threshold);
    u <- lr max(rms(p), 1e-3) u (the relative step, with ``multiply_by_parameter_scale``);
    optionally an average of u with ``momentum`` (kept in ``dtype_momentum``); then
    p <- p - (u + weight_decay_rate p). ``learning_rate=None`` leaves out the learning rate.

    ``torch.optim.Adafactor`` is the same algorithm with ``min_dim_size_to_factor=1``,
    ``decay_rate=-beta2_decay``, ``clipping_threshold=d`` and ``weight_decay_rate=lr *
    weight_decay``, with three differences: it always factors the last two axes (this, as optax,
    the two largest), it steps by ``min(lr, 1/sqrt(t))`` (equal while t <= 1 / lr^2), and it
    clamps the estimate of g^2 at ``eps1^2`` where this adds ``eps`` to g^2.

    Examples:
        >>> params = {"w": torch.tensor([[3.0, 4.0]])}
        >>> tx = fx.optim.adafactor(0.1)
        >>> updates, _ = tx.update({"w": torch.tensor([[0.5, -2.0]])}, tx.init(params), params)
        >>> updates["w"]  # -lr * rms(p) * sign(g) on the first step
        tensor([[-0.3536,  0.3536]])
    """
    _non_negative("adafactor", learning_rate=learning_rate, eps=eps,
                  weight_decay_rate=weight_decay_rate)
    if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
        raise ValueError(f"adafactor: momentum must be in [0, 1) or None, got {momentum}")
    if isinstance(clipping_threshold, (int, float)) and not clipping_threshold > 0:
        raise ValueError(f"adafactor: clipping_threshold must be > 0 or None, got "
                         f"{clipping_threshold}")
    txs = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        txs.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        txs.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        txs.append(scale_by_param_block_rms())
    if momentum is not None:
        txs.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        txs.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    txs.append(scale(-1))
    return chain(*txs)
