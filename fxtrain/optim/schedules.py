"""Schedules: pure functions of a 0-d int64 step count returning a 0-d float64 tensor.

They are tensor maths only (``torch.where`` instead of ``if``), so a compiled step evaluates
them in the graph and never recompiles as the count moves on. Names, arguments and defaults
are optax's (``optax.schedules``); values agree with optax's in float64.

Where optax quietly accepts an argument that makes no sense (a negative ``transition_begin``,
a negative boundary, a ``pct_start`` outside (0, 1), a zero ``decay_rate``), these raise a
``ValueError`` naming the schedule and the problem instead; each docstring says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from .base import Schedule

__all__ = [
    "constant_schedule", "linear_schedule", "polynomial_schedule", "cosine_decay_schedule",
    "exponential_decay", "piecewise_constant_schedule", "piecewise_interpolate_schedule",
    "cosine_onecycle_schedule", "linear_onecycle_schedule", "warmup_constant_schedule",
    "warmup_cosine_decay_schedule", "warmup_exponential_decay_schedule", "sgdr_schedule",
    "join_schedules",
]


def _f64(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def _full(value: float, count: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=torch.float64, device=count.device)


def _check_begin(name: str, transition_begin: int) -> None:
    if transition_begin < 0:
        raise ValueError(f"{name} needs transition_begin >= 0, got {transition_begin} "
                         "(optax would quietly use 0)")


def _sorted_boundaries(name: str, boundaries_and_scales: Mapping[int, float] | None):
    """The (boundary, scale) pairs in boundary order, checked."""
    items = sorted((boundaries_and_scales or {}).items())
    for boundary, scale in items:
        if boundary < 0:
            raise ValueError(f"{name} needs boundaries >= 0, got {boundary}")
        if scale < 0:
            raise ValueError(f"{name} expects non-negative scale factors, got {scale} at "
                             f"boundary {boundary}")
    return items


def constant_schedule(value: float) -> Schedule:
    """lr(t) = value.

    Examples:
        >>> fx.optim.constant_schedule(0.1)(torch.tensor(1000))
        tensor(0.1000, dtype=torch.float64)
    """
    return lambda count: _full(value, count)


def linear_schedule(init_value: float, end_value: float, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    """Moves linearly from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    A non-positive ``transition_steps`` gives the constant ``init_value`` (as in optax); a
    negative ``transition_begin`` is a ``ValueError`` (optax uses 0).

    Examples:
        >>> schedule = fx.optim.linear_schedule(1.0, 0.0, transition_steps=4)
        >>> [round(float(schedule(torch.tensor(t))), 2) for t in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    _check_begin("linear_schedule", transition_begin)
    if transition_steps <= 0:
        return constant_schedule(init_value)

    def schedule(count):
        frac = torch.clamp((_f64(count) - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + frac * (end_value - init_value)

    return schedule


def polynomial_schedule(init_value: float, end_value: float, power: float,
                        transition_steps: int, transition_begin: int = 0) -> Schedule:
    """lr(t) = (init - end) (1 - min(t - begin, T) / T)^power + end, for t >= begin.

    A non-positive ``transition_steps`` gives the constant ``init_value`` (as in optax); a
    negative ``transition_begin`` is a ``ValueError`` (optax uses 0).

    Args:
        init_value: the value up to ``transition_begin``.
        end_value: the value from ``transition_begin + transition_steps`` on.
        power: the polynomial's exponent (1 is linear).
        transition_steps: the number of steps from ``init_value`` to ``end_value``.
        transition_begin: the steps spent at ``init_value`` first.

    Examples:
        >>> schedule = fx.optim.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> [round(float(schedule(torch.tensor(t))), 4) for t in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    _check_begin("polynomial_schedule", transition_begin)
    if transition_steps <= 0:
        return constant_schedule(init_value)

    def schedule(count):
        steps = torch.clamp(count - transition_begin, 0, transition_steps)
        frac = 1.0 - _f64(steps) / transition_steps
        return (init_value - end_value) * frac ** power + end_value

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
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: float | None = None) -> Schedule:
    """lr(t) = init * decay_rate^((t - begin) / transition_steps) for t > begin, else init.

    Unlike optax, a non-positive ``transition_steps``, a ``decay_rate`` <= 0 or a negative
    ``transition_begin`` is a ``ValueError`` (optax gives a constant ``init_value`` for the
    first two and uses 0 for the last).

    Args:
        init_value: the value up to ``transition_begin``.
        transition_steps: the steps over which the value is multiplied by ``decay_rate``.
        decay_rate: the factor per ``transition_steps`` steps (above 1 grows the value).
        transition_begin: the steps spent at ``init_value`` first.
        staircase: decay in whole steps of ``transition_steps`` rather than smoothly.
        end_value: a floor (a ceiling when ``decay_rate`` >= 1) on the value, or None.

    Examples:
        >>> schedule = fx.optim.exponential_decay(1.0, transition_steps=2, decay_rate=0.5,
        ...                                       end_value=0.3)
        >>> [round(float(schedule(torch.tensor(t))), 3) for t in range(5)]
        [1.0, 0.707, 0.5, 0.354, 0.3]
        >>> stairs = fx.optim.exponential_decay(1.0, 2, 0.5, transition_begin=1, staircase=True)
        >>> [float(stairs(torch.tensor(t))) for t in range(6)]
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if transition_steps <= 0:
        raise ValueError(f"exponential_decay needs transition_steps > 0, got {transition_steps}")
    if decay_rate <= 0:
        raise ValueError(f"exponential_decay needs decay_rate > 0, got {decay_rate}")
    _check_begin("exponential_decay", transition_begin)
    clip = torch.maximum if decay_rate < 1 else torch.minimum

    def schedule(count):
        steps = count - transition_begin
        power = _f64(steps) / transition_steps
        if staircase:  # a Python constant: fixed when the schedule is built
            power = torch.floor(power)
        rate = _full(decay_rate, count)
        value = torch.where(steps <= 0, _full(init_value, count), init_value * rate ** power)
        return value if end_value is None else clip(value, _full(end_value, count))

    return schedule


def piecewise_constant_schedule(init_value: float,
                                boundaries_and_scales: Mapping[int, float] | None = None
                                ) -> Schedule:
    """``init_value`` times every scale whose boundary the count has reached.

    The boundaries are taken in sorted order (as in optax); a negative boundary or scale is a
    ``ValueError`` (optax refuses negative scales and accepts negative boundaries).

    Args:
        init_value: the value before the first boundary.
        boundaries_and_scales: ``{boundary: scale}``; from step ``boundary`` on, the value is
            multiplied by ``scale``.

    Examples:
        >>> schedule = fx.optim.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
        >>> [round(float(schedule(torch.tensor(t))), 3) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    items = _sorted_boundaries("piecewise_constant_schedule", boundaries_and_scales)

    def schedule(count):
        value = _full(init_value, count)
        for boundary, scale in items:
            value = torch.where(count >= boundary, value * scale, value)
        return value

    return schedule


def piecewise_interpolate_schedule(interpolate_type: str, init_value: float,
                                   boundaries_and_scales: Mapping[int, float] | None = None
                                   ) -> Schedule:
    """Like ``piecewise_constant_schedule``, but each change is spread over the interval
    before its boundary, linearly or along a half cosine.

    The value is 0 before step 0 and the last value after the last boundary. A negative
    boundary or scale is a ``ValueError`` (optax refuses negative scales only).

    Args:
        interpolate_type: ``"linear"`` or ``"cosine"``.
        init_value: the value at step 0.
        boundaries_and_scales: ``{boundary: scale}``; the value reaches the previous value
            times ``scale`` at step ``boundary``.

    Examples:
        >>> schedule = fx.optim.piecewise_interpolate_schedule("linear", 1.0, {4: 0.5})
        >>> [float(schedule(torch.tensor(t))) for t in range(6)]
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    """
    name = "piecewise_interpolate_schedule"
    if interpolate_type not in ("linear", "cosine"):
        raise ValueError(f"{name}: interpolate_type must be 'linear' or 'cosine', got "
                         f"{interpolate_type!r}")
    items = _sorted_boundaries(name, boundaries_and_scales)
    bounds = [0] + [boundary for boundary, _ in items]
    values = [float(init_value)]
    for _, scale in items:
        values.append(values[-1] * scale)

    def interpolate(start, end, pct):
        if interpolate_type == "linear":
            return (end - start) * pct + start
        return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1.0)

    def schedule(count):
        value = torch.where(count >= bounds[-1], _full(values[-1], count), _full(0.0, count))
        for i in range(len(items)):
            pct = _f64(count - bounds[i]) / max(bounds[i + 1] - bounds[i], 1)
            inside = (count >= bounds[i]) & (count < bounds[i + 1])
            value = torch.where(inside, interpolate(values[i], values[i + 1], pct), value)
        return value

    return schedule


def _check_onecycle(name: str, transition_steps: int, pct_start: float) -> None:
    if transition_steps <= 0:
        raise ValueError(f"{name} needs transition_steps > 0, got {transition_steps}")
    if not 0 < pct_start < 1:
        raise ValueError(f"{name} needs 0 < pct_start < 1, got {pct_start}")


def cosine_onecycle_schedule(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                             div_factor: float = 25.0, final_div_factor: float = 1e4
                             ) -> Schedule:
    """One cycle (Smith and Topin, 2017): a half cosine up from ``peak_value / div_factor``
    to ``peak_value`` over the first ``pct_start`` of ``transition_steps``, then down to
    ``peak_value / (div_factor * final_div_factor)``.

    A ``pct_start`` outside (0, 1) is a ``ValueError`` (optax accepts it).

    Args:
        transition_steps: the length of the cycle.
        peak_value: the largest value, at step ``int(pct_start * transition_steps)``.
        pct_start: the fraction of the cycle spent rising.
        div_factor: the starting value is ``peak_value / div_factor``.
        final_div_factor: the final value is the starting value / ``final_div_factor``.

    Examples:
        >>> schedule = fx.optim.cosine_onecycle_schedule(10, 1.0, pct_start=0.2,
        ...                                              div_factor=10.0, final_div_factor=10.0)
        >>> [round(float(schedule(torch.tensor(t))), 3) for t in (0, 1, 2, 6, 10, 20)]
        [0.1, 0.55, 1.0, 0.505, 0.01, 0.01]
    """
    _check_onecycle("cosine_onecycle_schedule", transition_steps, pct_start)
    return piecewise_interpolate_schedule("cosine", peak_value / div_factor, {
        int(pct_start * transition_steps): div_factor,
        int(transition_steps): 1.0 / (div_factor * final_div_factor),
    })


def linear_onecycle_schedule(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                             pct_final: float = 0.85, div_factor: float = 25.0,
                             final_div_factor: float = 1e4) -> Schedule:
    """One cycle, linearly: from ``peak_value / div_factor`` up to ``peak_value`` by
    ``pct_start`` of ``transition_steps``, back down by ``pct_final``, then down to
    ``peak_value / (div_factor * final_div_factor)`` at ``transition_steps``.

    ``0 < pct_start < pct_final < 1`` is required (a ``ValueError`` otherwise; optax accepts
    any values).

    Args:
        transition_steps: the length of the cycle.
        peak_value: the largest value, at step ``int(pct_start * transition_steps)``.
        pct_start: the fraction of the cycle spent rising.
        pct_final: the fraction of the cycle at which the value is back to its start.
        div_factor: the starting value is ``peak_value / div_factor``.
        final_div_factor: the final value is the starting value / ``final_div_factor``.

    Examples:
        >>> schedule = fx.optim.linear_onecycle_schedule(10, 1.0, pct_start=0.2, pct_final=0.6,
        ...                                              div_factor=10.0, final_div_factor=10.0)
        >>> [round(float(schedule(torch.tensor(t))), 3) for t in (0, 1, 2, 4, 6, 8, 10)]
        [0.1, 0.55, 1.0, 0.55, 0.1, 0.055, 0.01]
    """
    name = "linear_onecycle_schedule"
    _check_onecycle(name, transition_steps, pct_start)
    if not pct_start < pct_final < 1:
        raise ValueError(f"{name} needs pct_start < pct_final < 1, got pct_start={pct_start}, "
                         f"pct_final={pct_final}")
    return piecewise_interpolate_schedule("linear", peak_value / div_factor, {
        int(pct_start * transition_steps): div_factor,
        int(pct_final * transition_steps): 1.0 / div_factor,
        transition_steps: 1.0 / final_div_factor,
    })


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i]`` from ``boundaries[i-1]`` on, each fed the count since its boundary.

    The boundaries must be non-negative and in order (a ``ValueError`` otherwise).

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
    if any(b < 0 for b in boundaries) or list(boundaries) != sorted(boundaries):
        raise ValueError(f"join_schedules needs non-negative boundaries in increasing order, "
                         f"got {list(boundaries)}")

    def schedule(count):
        value = schedules[0](count)
        for boundary, nxt in zip(boundaries, schedules[1:]):
            value = torch.where(count >= boundary, nxt(count - boundary), value)
        return value

    return schedule


def warmup_constant_schedule(init_value: float, peak_value: float, warmup_steps: int
                             ) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then
    ``peak_value``.

    ``warmup_steps`` <= 0 is a ``ValueError``: optax then gives ``init_value`` for ever, never
    reaching the peak; for no warm-up use ``constant_schedule(peak_value)``.

    Args:
        init_value: the value at step 0.
        peak_value: the value from ``warmup_steps`` on.
        warmup_steps: the length of the warm-up.

    Examples:
        >>> schedule = fx.optim.warmup_constant_schedule(0.0, 1.0, warmup_steps=4)
        >>> [float(schedule(torch.tensor(t))) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if warmup_steps <= 0:
        raise ValueError(f"warmup_constant_schedule needs warmup_steps > 0, got {warmup_steps} "
                         "(for no warm-up, use constant_schedule(peak_value))")
    return linear_schedule(init_value, peak_value, warmup_steps)


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


def warmup_exponential_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                                      transition_steps: int, decay_rate: float,
                                      transition_begin: int = 0, staircase: bool = False,
                                      end_value: float | None = None) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then ``exponential_decay`` from
    ``peak_value``, fed the count since the warm-up ended.

    ``exponential_decay``'s checks apply (stricter than optax's: see there).

    Args:
        init_value: the value at step 0.
        peak_value: the value at the end of the warm-up.
        warmup_steps: the length of the warm-up.
        transition_steps: the steps over which the value is multiplied by ``decay_rate``.
        decay_rate: the factor per ``transition_steps`` steps.
        transition_begin: the steps spent at ``peak_value`` after the warm-up.
        staircase: decay in whole steps of ``transition_steps`` rather than smoothly.
        end_value: a floor (a ceiling when ``decay_rate`` >= 1) on the decay, or None.

    Examples:
        >>> schedule = fx.optim.warmup_exponential_decay_schedule(
        ...     0.0, 1.0, warmup_steps=2, transition_steps=1, decay_rate=0.5)
        >>> [float(schedule(torch.tensor(t))) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.25, 0.125]
    """
    return join_schedules(
        [linear_schedule(init_value, peak_value, warmup_steps),
         exponential_decay(peak_value, transition_steps, decay_rate, transition_begin,
                           staircase, end_value)],
        [warmup_steps],
    )


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, float]]) -> Schedule:
    """Warm restarts (Loshchilov and Hutter, 2017): ``warmup_cosine_decay_schedule`` cycles
    one after another, each made from one dict of keyword arguments and lasting its
    ``decay_steps``.

    Args:
        cosine_kwargs: one dict of ``warmup_cosine_decay_schedule`` arguments per cycle.

    Examples:
        >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3)
        >>> schedule = fx.optim.sgdr_schedule([cycle, cycle])
        >>> [float(schedule(torch.tensor(t))) for t in range(7)]
        [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    """
    schedules, boundaries, step = [], [], 0
    for kwargs in cosine_kwargs:
        schedules.append(warmup_cosine_decay_schedule(**kwargs))
        step += kwargs["decay_steps"]
        boundaries.append(step)
    if not schedules:
        raise ValueError("sgdr_schedule needs at least one cycle in cosine_kwargs")
    return join_schedules(schedules, boundaries[:-1])
