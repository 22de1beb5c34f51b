"""``fx.losses.Mean``, a loss as a sum and what it averages over, and the label that marks no
target: below ``losses.py`` and ``_chunked_ce.py``, which both return one."""

from __future__ import annotations

import dataclasses

import torch

from .._torch import kernels

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
        count = self.count
        if count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise TypeError(f"fx.losses.Mean: count must be an integer tensor (the number of "
                            f"items the total sums over), got {count.dtype}; count the items, "
                            f"as (labels != -100).sum() does")
        object.__setattr__(self, "count", _nonnegative(count))

    @property
    def value(self) -> torch.Tensor:
        """``total / count``, 0 for no items."""
        count = self.count.to(self.total.dtype)
        return torch.where(count > 0, self.total / count.clamp_min(1), 0.0)


@torch.library.custom_op("fxtrain::nonnegative_count", mutates_args=())
def _nonnegative(count: torch.Tensor) -> torch.Tensor:
    """A copy of ``count``, which must be >= 0 (the step weighs a loss's gradient by it: a
    negative count would turn it round). One operator, whose copy ``Mean`` keeps (so a compiled
    graph keeps it): a device-side check, no read on the host (``kernels.assert_on_device``);
    where it fails at once (the CPU) the count is read and named."""
    try:
        kernels.assert_on_device((count >= 0).all(), _NEGATIVE.format("a negative count"))
    except RuntimeError:
        raise ValueError(_NEGATIVE.format(int(count.min()))) from None
    return count.clone()


_NEGATIVE = ("fx.losses.Mean: count must be >= 0 (the number of items the total sums over), "
             "got {}")


@_nonnegative.register_fake
def _(count):
    return torch.empty_like(count)


@torch.library.register_vmap("fxtrain::nonnegative_count")
def _(info, in_dims, count):
    """Every entry's count checked at once."""
    del info
    return _nonnegative(count), in_dims[0]
