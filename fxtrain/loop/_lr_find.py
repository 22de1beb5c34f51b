"""``fx.lr_find``: a learning-rate range test (Smith, 2017; Lightning's ``lr_find``).

Training starts at a tiny learning rate that grows exponentially, step by step, to a large one;
the loss, smoothed, falls while the rate is useful and blows up once it is too large. The
suggestion is the rate where the smoothed loss falls fastest (the steepest negative slope
against log(lr)), searched before the loss's minimum, as Lightning does. The model passed in is
not changed: the test trains a ``TrainState`` of its own (a copy of the weights).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..data._feed import to_device
from ..optim.base import GradientTransformation
from ..state import TrainState
from ..step._steps import make_train_step

__all__ = ["LrFind", "lr_find"]


@dataclasses.dataclass(frozen=True)
class LrFind:
    """The curve of a range test and its suggestion.

    Attributes:
      lrs: the learning rate of each step taken.
      losses: each step's loss, smoothed (an exponential moving average, bias-corrected).
      raw_losses: each step's loss as the step reported it.
      suggestion: the rate at the steepest descent of the smoothed loss (None when the curve
        is too short or never falls).
      stopped_early: the loss diverged (past ``diverge`` times its best) before the last rate.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestion: float | None
    stopped_early: bool

    def plot(self, ax: Any = None, path: Any = None) -> Any:
        """The curve on a log-rate axis with the suggestion marked; a matplotlib figure
        (drawn on ``ax`` when given; saved to ``path`` when given)."""
        if ax is None:  # pyplot's backend as it is: a notebook's shows the figure
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(5, 3.5))
        else:
            fig = ax.figure
        ax.plot(self.lrs, self.losses, label="loss (smoothed)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="tab:red", linestyle="--",
                       label=f"suggestion {self.suggestion:.2e}")
        ax.legend()
        if path is not None:
            fig.savefig(path, bbox_inches="tight")
        return fig


def _rates(min_lr: float, max_lr: float, steps: int) -> list[float]:
    return [min_lr * (max_lr / min_lr) ** (i / max(steps - 1, 1)) for i in range(steps)]


def _smoothed(raw: list[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(raw, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def _suggest(lrs: list[float], losses: list[float], skip_start: int,
             skip_end: int) -> float | None:
    """The rate of the steepest fall of ``losses`` against log(lr), before the minimum, with
    the first ``skip_start`` and last ``skip_end`` points left out (noise and blow-up)."""
    end = len(losses) - skip_end
    if end - skip_start < 3:
        return None
    lowest = min(range(skip_start, end), key=losses.__getitem__)
    if lowest - skip_start < 2:
        return None
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1])
              for i in range(skip_start + 1, lowest)]
    best = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[skip_start + 1 + best] if slopes[best] < 0 else None


def lr_find(model: torch.nn.Module, optimizer: Callable[[Any], GradientTransformation],
            loss_fn: Callable, data: Iterable, *, min_lr: float = 1e-7, max_lr: float = 1.0,
            steps: int = 100, smoothing: float = 0.98, diverge: float = 4.0,
            skip_start: int = 10, skip_end: int = 1, seed: int = 0,
            compile: bool = False) -> LrFind:
    """A learning-rate range test of ``model`` trained with ``optimizer(lr)`` on ``data``.

    Args:
      model: the module; it is copied, not changed.
      optimizer: the optimizer as a function of its learning rate, such as ``fx.optim.adamw``
        or ``functools.partial(fx.optim.adamw, weight_decay=0.01)``; it is given a schedule.
      loss_fn: ``loss_fn(state, params, batch)``, as ``make_train_step`` takes.
      data: batches, read once (an ``fx.data.Batches`` repeats: any iterable of at least
        ``steps`` batches, or one that repeats).
      min_lr: the first rate.
      max_lr: the last rate (the rates between grow exponentially).
      steps: steps taken (fewer when the loss diverges).
      smoothing: the moving average's weight on the past (Lightning's 0.98).
      diverge: stop once the smoothed loss exceeds this many times its lowest.
      skip_start: points the suggestion ignores at the start (noise).
      skip_end: points the suggestion ignores at the end (the blow-up).
      seed: the state's key.
      compile: compile the step (a long test on a large model); eager by default.

    Returns:
      An ``LrFind``: ``lrs``, ``losses``, ``suggestion``, and ``plot()``.

    Examples:
        >>> x = torch.randn(256, 4)
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        >>> def loss_fn(state, params, batch):
        ...     return ((state.apply(params, batch[0]) - batch[1]) ** 2).mean()
        >>> data = fx.data.Batches((x, y), 32, seed=0)
        >>> found = fx.lr_find(nn.Linear(4, 1), fx.optim.sgd, loss_fn, data, steps=60,
        ...                    min_lr=1e-4, max_lr=10.0)
        >>> 1e-3 < found.suggestion < 1.0, found.losses[-1] > found.losses[0]  # blown up
        (True, True)
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"lr_find: need 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if steps < 2:
        raise ValueError(f"lr_find: steps must be at least 2, got {steps}")
    lrs = _rates(min_lr, max_lr, steps)
    table = torch.tensor(lrs, dtype=torch.float64)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        return table.to(count.device)[count.clamp(max=steps - 1)].float()

    state = TrainState.create(model, optimizer(schedule), seed=seed)
    step = make_train_step(loss_fn)
    if compile:
        step = torch.compile(step, fullgraph=True)
    batches = _stream(data)
    raw: list[float] = []
    pending: list[torch.Tensor] = []
    stopped = False
    for i in range(steps):
        batch = to_device(next(batches), state.step.device)
        state, metrics = step(state, batch, donate=True)
        pending.append(metrics["loss"])
        if len(pending) == 10 or i == steps - 1:  # one read per ten steps
            raw += torch.stack(pending).double().tolist()
            pending = []
            smooth = _smoothed(raw, smoothing)
            finite = [v for v in smooth if math.isfinite(v)]
            if not math.isfinite(smooth[-1]) or (finite and smooth[-1] > diverge * min(finite)):
                stopped = i < steps - 1
                break
    smooth = _smoothed(raw, smoothing)
    cut = next((i for i, v in enumerate(smooth) if not math.isfinite(v)), len(smooth))
    taken = lrs[:len(raw)]
    return LrFind(lrs=taken, losses=smooth, raw_losses=raw,
                  suggestion=_suggest(taken[:cut], smooth[:cut], skip_start, skip_end),
                  stopped_early=stopped)


def _stream(data: Iterable):
    """The batches of ``data``: an ``fx.data.Batches`` from its start, repeating; any other
    iterable as it is (refreshed when exhausted, if it can be iterated again)."""
    if hasattr(data, "init") and hasattr(data, "next"):  # fx.data.Batches: a position
        position = data.init()
        while True:
            batch, position, _ = data.next(position)
            yield batch
    for _ in itertools.count():
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: data gave no batches")
