"""Schedules: pure functions of a 0-d int64 step count returning a 0-d float64 tensor.

They are tensor maths only (``torch.where`` instead of ``if``), so a compiled step evaluates
them in the graph and never recompiles as the count moves on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Schedule

__all__ = [
    "constant_schedule", "linear_schedule", "cosine_decay_schedule", "exponential_decay",
    "warmup_cosine_decay_schedule", "join_schedules",
]


def _f64(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def constant_schedule(value: float) -> Schedule:
    """lr(t) = value.

    Examples:
        >>> fx.optim.constant_schedule(0.1)(torch.tensor(1000))
        tensor(0.1000, dtype=torch.float64)
    """
    return lambda count: torch.full((), float(value), dtype=torch.float64, device=count.device)


def linear_schedule(init_value: float, end_value: float, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    """Moves linearly from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    Examples:
        >>> schedule = fx.optim.linear_schedule(1.0, 0.0, transition_steps=4)
        >>> [round(float(schedule(torch.tensor(t))), 2) for t in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    if transition_steps <= 0:
        return constant_schedule(init_value)

    def schedule(count):
        frac = torch.clamp((_f64(count) - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + frac * (end_value - init_value)

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0,
                          exponent: float = 1.0) -> Schedule:
    """lr(t) = init ((1 - alpha) (0.5 (1 + cos(pi min(t, T) / T)))^exponent + alpha).

    Examples:
        >>> schedule = fx.optim.cosine_decay_schedule(1.0, decay_steps=4)
        >>> [round(float(schedule(torch.tensor(t))), 2) for t in range(6)]
        [1.0, 0.85, 0.5, 0.15, 0.0, 0.0]
    """
    if decay_steps <= 0:
        raise ValueError(f"cosine_decay_schedule needs decay_steps > 0, got {decay_steps}")

    def schedule(count):
        frac = torch.clamp(_f64(count) / decay_steps, max=1.0)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * frac))
        return init_value * ((1.0 - alpha) * cosine ** exponent + alpha)

    return schedule


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float,
                      end_value: float | None = None) -> Schedule:
    """lr(t) = init * decay_rate^(t / transition_steps), clipped at ``end_value``.

    Examples:
        >>> schedule = fx.optim.exponential_decay(1.0, transition_steps=2, decay_rate=0.5,
        ...                                       end_value=0.3)
        >>> [round(float(schedule(torch.tensor(t))), 3) for t in range(5)]
        [1.0, 0.707, 0.5, 0.354, 0.3]
    """
    if transition_steps <= 0:
        raise ValueError(f"exponential_decay needs transition_steps > 0, got {transition_steps}")

    def schedule(count):
        rate = torch.tensor(decay_rate, dtype=torch.float64, device=count.device)
        value = init_value * torch.pow(rate, _f64(count) / transition_steps)
        if end_value is None:
            return value
        return torch.maximum(value, torch.full_like(value, end_value)) if decay_rate < 1 else \
            torch.minimum(value, torch.full_like(value, end_value))

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i]`` from ``boundaries[i-1]`` on, each fed the count since its boundary.

    Examples:
        >>> schedule = fx.optim.join_schedules(
        ...     [fx.optim.constant_schedule(1.0), fx.optim.linear_schedule(0.5, 0.0, 2)],
        ...     boundaries=[2])
        >>> [float(schedule(torch.tensor(t))) for t in range(5)]
        [1.0, 1.0, 0.5, 0.25, 0.0]
    """
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join_schedules needs len(boundaries) == len(schedules) - 1, got "
                         f"{len(boundaries)} boundaries for {len(schedules)} schedules")

    def schedule(count):
        value = schedules[0](count)
        for boundary, nxt in zip(boundaries, schedules[1:]):
            value = torch.where(count >= boundary, nxt(count - boundary), value)
        return value

    return schedule


def warmup_cosine_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                                 decay_steps: int, end_value: float = 0.0,
                                 exponent: float = 1.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the whole schedule, warm-up included (as in optax).

    Examples:
        >>> schedule = fx.optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2,
        ...                                                  decay_steps=6)
        >>> [round(float(schedule(torch.tensor(t))), 2) for t in range(7)]
        [0.0, 0.5, 1.0, 0.85, 0.5, 0.15, 0.0]
    """
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    return join_schedules(
        [linear_schedule(init_value, peak_value, warmup_steps),
         cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)],
        [warmup_steps],
    )
