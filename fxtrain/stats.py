"""Statistics of tensors for monitoring, in tensor maths that compiles into a step: norms per
parameter, and histograms in one packed, fixed-shape format (``[lo, hi, count_1, ...,
count_bins]``) that ``unpack_histogram`` reads back on the host (``fx.logging.Histogram``)."""

from __future__ import annotations

import numpy as np
import torch

from .tree import squared_norms

__all__ = ["gradient_statistics", "HISTOGRAM_BINS", "histograms", "gradient_histograms",
           "unpack_histogram"]


def gradient_statistics(grads: dict[str, torch.Tensor],
                        squared: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-parameter gradient norms (``grad_norm/<name>``) and their max, min and mean.

    ``squared`` may pass in ``squared_norms`` of the gradients when they are already computed.

    Examples:
        >>> grads = {"weight": torch.tensor([[3.0, 4.0]]), "bias": torch.tensor([0.0])}
        >>> fx.stats.gradient_statistics(grads)
        {'grad_norm/weight': tensor(5.), 'grad_norm/bias': tensor(0.),
         'grad_norm_max': tensor(5.), 'grad_norm_min': tensor(0.), 'grad_norm_mean': tensor(2.5000)}
    """
    squared = squared_norms(list(grads.values())) if squared is None else squared
    norms = torch.sqrt(torch.stack(squared))
    stats = {f"grad_norm/{name}": n for name, n in zip(grads, norms.unbind())}
    return {**stats, "grad_norm_max": norms.max(), "grad_norm_min": norms.min(),
            "grad_norm_mean": norms.mean()}


HISTOGRAM_BINS = 64
"""The bins of a packed gradient histogram."""


def histograms(tensors: dict[str, torch.Tensor],
               bins: int = HISTOGRAM_BINS) -> dict[str, torch.Tensor]:
    """A histogram of each tensor, packed as a float32 tensor ``[lo, hi, count_1, ...,
    count_bins]`` with ``bins`` equal bins over ``[lo, hi]``, the tensor's range. Fixed shapes
    and tensor maths only, so it compiles into a step's graph and reads nothing to the host
    (``fx.logging.Histogram.from_packed`` unpacks it). Non-finite entries are left out (with
    none finite, ``lo > hi`` and the counts are 0).

    Examples:
        >>> t = torch.tensor([0.0, 0.1, 0.5, 1.0, float("nan")])
        >>> packed = fx.stats.histograms({"w": t}, bins=4)["w"]
        >>> packed  # lo, hi, then 4 counts; the NaN is not counted
        tensor([0., 1., 2., 0., 1., 1.])
        >>> edges, counts = fx.stats.unpack_histogram(packed)
        >>> edges.tolist(), counts.tolist()
        ([0.0, 0.25, 0.5, 0.75, 1.0], [2.0, 0.0, 1.0, 1.0])
    """
    out = {}
    for name, t in tensors.items():
        flat = t.detach().reshape(-1).to(torch.float32)
        finite = torch.isfinite(flat)
        lo = torch.where(finite, flat, torch.inf).min()
        hi = torch.where(finite, flat, -torch.inf).max()
        width = torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
        scaled = torch.where(finite, (flat - lo) / width * bins, 0.0)
        index = torch.clamp(scaled.to(torch.int64), 0, bins - 1)
        counts = torch.zeros(bins, dtype=torch.float32, device=flat.device).index_add(
            0, index, finite.to(torch.float32))
        out[name] = torch.cat([torch.stack([lo, hi]), counts])
    return out


def gradient_histograms(grads: dict[str, torch.Tensor],
                        bins: int = HISTOGRAM_BINS) -> dict[str, torch.Tensor]:
    """``histograms`` of the gradients, as the step's ``grad_hist/<name>`` metrics.

    Examples:
        >>> grads = {"weight": torch.tensor([[3.0, 4.0]]), "bias": torch.tensor([0.0])}
        >>> fx.stats.gradient_histograms(grads, bins=2)
        {'grad_hist/weight': tensor([3., 4., 1., 1.]), 'grad_hist/bias': tensor([0., 0., 1., 0.])}
    """
    return {f"grad_hist/{k}": v for k, v in histograms(grads, bins).items()}


def unpack_histogram(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, counts)`` from a packed ``[lo, hi, count_1, ..., count_n]`` (float64): n equal
    bins over ``[lo, hi]``; with nothing counted, ``lo > hi`` and the edges are all 0.

    Examples:
        >>> edges, counts = fx.stats.unpack_histogram([-1.0, 1.0, 3.0, 5.0])
        >>> edges.tolist(), counts.tolist()
        ([-1.0, 0.0, 1.0], [3.0, 5.0])
        >>> empty = fx.stats.histograms({"w": torch.full((3,), float("inf"))}, bins=2)["w"]
        >>> [x.tolist() for x in fx.stats.unpack_histogram(empty)]
        [[0.0, 0.0, 0.0], [0.0, 0.0]]
    """
    packed = np.asarray(packed, dtype=np.float64).reshape(-1)
    lo, hi, counts = packed[0], packed[1], packed[2:]
    if not lo <= hi:  # no finite value was counted
        lo = hi = 0.0
    return np.linspace(lo, hi, len(counts) + 1), counts
