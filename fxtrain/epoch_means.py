"""``EpochMeans``: the mean of each training metric over an epoch, for the epoch_end event.

``fit`` adds each step call's metrics (one list append: nothing is computed per step) and
folds them into running sums on the device every ``FOLD_EVERY`` calls (one stack and sum per
metric), so an epoch of any length holds a bounded number of tensors and costs no host sync.
Only float 0-d values count (a loss, an accuracy, a learning rate); ``control/*`` flags,
integers and tensors with a shape (histograms) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["EpochMeans"]

FOLD_EVERY = 64


def _averageable(key: str, value: Any) -> bool:
    if key.startswith("control/"):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.is_floating_point()
    return isinstance(value, float)


class EpochMeans:
    """Running means of the float 0-d metrics of the step calls added since it was made.

    Examples:
        >>> from fxtrain.epoch_means import EpochMeans
        >>> means = EpochMeans()
        >>> for loss in (1.0, 2.0, 6.0):
        ...     means.add({"loss": torch.tensor(loss), "control/stop": torch.tensor(False)})
        >>> means.add({"loss": torch.tensor(3.0), "lr": 0.1})  # keys may come and go
        >>> means.means()
        {'loss': tensor(3.), 'lr': tensor(0.1000)}
    """

    def __init__(self):
        self.pending: list[Mapping[str, Any]] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.pending.append(metrics)
        if len(self.pending) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        columns: dict[str, list] = {}
        for metrics in self.pending:
            for key, value in metrics.items():
                if _averageable(key, value):
                    columns.setdefault(key, []).append(value)
        self.pending = []
        for key, values in columns.items():
            device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
            total = torch.stack([torch.as_tensor(v, device=device).float().detach()
                                 for v in values]).sum()
            self.sums[key] = total if key not in self.sums else self.sums[key] + total
            self.counts[key] = self.counts.get(key, 0) + len(values)

    def means(self) -> dict[str, torch.Tensor]:
        """``{name: mean}`` as 0-d float32 tensors on the metrics' device (no sync)."""
        self._fold()
        return {key: total / self.counts[key] for key, total in self.sums.items()}
