"""``fx.losses.Mean``, a loss as a sum and what it averages over, and the label that marks no
target: below ``losses.py`` and ``_chunked_ce.py``, which both return one."""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100
"""The label that marks a position without a target (padding, a prompt), as torch's
``cross_entropy`` and transformers use it."""


@dataclasses.dataclass(frozen=True)
class Mean:
    """A loss as a sum over items and the number of items: its value is ``total / count``
    (0 where ``count`` is 0: a batch of padding only adds nothing).

    Examples:
        >>> m = fx.losses.Mean(torch.tensor(6.0), torch.tensor(4))
        >>> m.value
        tensor(1.5000)
        >>> fx.losses.Mean(torch.tensor(0.0), torch.tensor(0)).value
        tensor(0.)
    """

    total: torch.Tensor
    count: torch.Tensor

    def __post_init__(self):
        for name in ("total", "count"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 0:
                what = (f"a tensor of shape {tuple(value.shape)}"
                        if isinstance(value, torch.Tensor) else type(value).__name__)
                raise TypeError(f"fx.losses.Mean: {name} must be a 0-d tensor, got {what}")
        if not self.total.is_floating_point():
            raise TypeError(f"fx.losses.Mean: total must be floating point, got "
                            f"{self.total.dtype}")

    @property
    def value(self) -> torch.Tensor:
        """``total / count``, 0 for no items."""
        count = self.count.to(self.total.dtype)
        return self.total / count.clamp_min(1)
