"""``Means``: step metrics averaged over an interval on the device, with no per-step work.

Each step call's metrics dict is kept as it comes (one list append); every ``collapse`` calls,
and when the means are taken, the kept values are stacked and summed on the device (one op per
metric), so an interval of any length holds a bounded number of tensors and nothing is read
back to the host. ``log_metrics`` averages its logging intervals with it, ``fit`` each epoch
for the epoch_end event.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

_NOT_AVERAGED = ("control/", "grad_hist/")  # the loop's flags; model_watch's histograms
_WEIGHTS = {"loss": "loss_count"}  # a metric averaged by another: fx.losses.Mean's count


def loggable(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The step metrics that are averaged and logged as numbers: all but the in-step control
    flags and the gradient histograms (``grad_hist/*``, written by ``model_watch``).

    Examples:
        >>> from fxtrain.metrics._means import loggable
        >>> metrics = {"loss": torch.tensor(0.5), "control/stop": torch.tensor(False),
        ...            "grad_hist/weight": torch.zeros(66)}
        >>> loggable(metrics)
        {'loss': tensor(0.5000)}
    """
    return {k: v for k, v in (metrics or {}).items() if not k.startswith(_NOT_AVERAGED)}


class Means:
    """The mean of each step metric over the calls added since the last ``take``; ``loss``
    weighted by ``loss_count`` where every call has one (``fx.losses.Mean``: the mean over
    every item of the interval).

    Args:
      who: the name a metric with a shape is refused in (``"log_metrics"``); None leaves such
        metrics out instead.
      collapse: calls kept as separate tensors before they are summed.

    Examples:
        >>> from fxtrain.metrics._means import Means
        >>> means = Means()
        >>> for loss in (1.0, 2.0, 6.0):
        ...     means.add({"loss": torch.tensor(loss), "control/stop": torch.tensor(False)})
        >>> means.add({"loss": torch.tensor(3.0), "lr": 0.1, "hist": torch.ones(2)})
        >>> means.take()  # keys may come and go; "hist" has a shape, so it is left out
        {'loss': tensor(3.), 'lr': tensor(0.1000)}
        >>> strict = Means(who="log_metrics")
        >>> strict.add({"hist": torch.ones(2)})
        >>> strict.take()
        Traceback (most recent call last):
        ...
        ValueError: log_metrics: step metric 'hist' has shape (2,); step metrics must be one
        number each (0-d tensors)
    """

    def __init__(self, who: str | None = None, collapse: int = 256):
        self.who, self.collapse = who, collapse
        self.pending: list[Mapping[str, Any]] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.pending or self.counts)

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.pending.append(metrics)
        if len(self.pending) >= self.collapse:
            self._collapse()

    def _collapse(self) -> None:
        pending, self.pending = self.pending, []
        for k in loggable(dict.fromkeys(itertools.chain.from_iterable(pending))):
            values = [m[k] for m in pending if k in m]
            weights = [m.get(_WEIGHTS.get(k)) for m in pending if k in m]
            if k in _WEIGHTS and all(w is not None for w in weights):  # by the items of each
                w = torch.stack([torch.as_tensor(w) for w in weights]).to(torch.float32)
                total, count = self._sum(k, [v * x for v, x in zip(values, w)]), w.sum()
            else:
                total, count = self._sum(k, values), len(values)
            if total is None:
                continue
            self.sums[k] = total if k not in self.sums else self.sums[k] + total
            self.counts[k] = self.counts.get(k, 0) + count

    def _sum(self, key: str, values: list) -> torch.Tensor | None:
        try:  # the common case, 0-d tensors of one dtype and device: one op
            stacked = torch.stack(values)
        except (TypeError, RuntimeError):
            stacked = None
        if stacked is not None and stacked.ndim == 1:
            return stacked.to(torch.float32).sum()
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        tensors = [torch.as_tensor(v, device=device) for v in values]
        bad = next((t for t in tensors if t.numel() != 1), None)
        if bad is not None:
            if self.who is None:
                return None
            raise ValueError(f"{self.who}: step metric {key!r} has shape {tuple(bad.shape)}; "
                             "step metrics must be one number each (0-d tensors)")
        return torch.stack([t.reshape(()) for t in tensors]).to(torch.float32).sum()

    def take(self) -> dict[str, torch.Tensor]:
        """The means since the last ``take`` (0-d float32 tensors, nothing read); it starts
        again."""
        self._collapse()
        means = {k: self.sums[k] / _at_least_one(self.counts[k]) for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


def _at_least_one(count: int | torch.Tensor) -> int | torch.Tensor:
    """A count of steps, or of items (a tensor: a loss weighted by ``loss_count``, which an
    interval of padding only leaves at 0: its mean is then 0, not NaN)."""
    return count.clamp_min(1.0) if isinstance(count, torch.Tensor) else count
