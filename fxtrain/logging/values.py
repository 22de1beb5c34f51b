"""Turning what users log (tensors, numpy arrays, Python numbers) into host values, with the
checks every writer shares: finite scalars, image and video shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..stats import unpack_histogram
from .media import figure_pixels, is_figure
from .numbers import read_floats

def as_array(value: Any) -> np.ndarray:
    """A numpy array of ``value`` (a tensor on any device, an array or a number).

    Examples:
        >>> from fxtrain.logging.values import as_array
        >>> a = as_array(torch.tensor([0.5, 2.0], dtype=torch.bfloat16))  # numpy has no bf16
        >>> a.tolist(), a.dtype
        ([0.5, 2.0], dtype('float32'))
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16 or value.dtype.is_floating_point and value.itemsize < 4:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def scalar_values(mapping: Mapping[str, Any], warned: set[str] | None = None) -> dict[str, float]:
    """``{key: float}`` (device tensors read in one transfer per device); a non-finite value is
    kept (as NaN or inf) and warned about: once per key where the caller passes ``warned``, the
    set of keys it has warned about (a writer's own, so no table outlives it), else each time.

    Examples:
        >>> from fxtrain.logging.values import scalar_values
        >>> scalar_values({"loss": torch.tensor(0.25), "epoch": 3})
        {'loss': 0.25, 'epoch': 3.0}
    """
    out = read_floats(mapping)
    for k, x in out.items():
        if not math.isfinite(x) and (warned is None or k not in warned):
            if warned is not None:
                warned.add(k)
            warnings.warn(f"logged scalar {k!r} is {x}; it is written as is", stacklevel=3)
    return out


def _pixels(key: str, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} {key!r} has {arr.shape[-1]} channels (last axis of shape "
                         f"{arr.shape}); expected 1, 3 or 4 (channels last)")
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr.astype(np.uint8)


def image_batch(key: str, value: Any) -> np.ndarray:
    """``[N, H, W, C]`` uint8 from ``[N, H, W, C]`` or ``[H, W, C]`` (floats in [0, 1]) or a
    matplotlib figure (drawn, left open: the caller owns it).

    Examples:
        >>> from fxtrain.logging.values import image_batch
        >>> images = image_batch("samples", torch.full((8, 8, 3), 0.5))
        >>> images.shape, images.dtype, int(images.max())
        ((1, 8, 8, 3), dtype('uint8'), 128)
        >>> image_batch("samples", torch.zeros(3, 8, 8))  # channels first
        Traceback (most recent call last):
        ...
        ValueError: image 'samples' has 8 channels (last axis of shape (1, 3, 8, 8)); expected
        1, 3 or 4 (channels last)
    """
    if is_figure(value):
        return figure_pixels(value, close=False)[None]
    arr = as_array(value)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"image {key!r} has shape {arr.shape}; expected [N, H, W, C] or "
                         "[H, W, C] (channels last)")
    return _pixels(key, arr, "image")


def histogram_values(key: str, value: Any) -> np.ndarray:
    """Raw values to bin, flat float64; an empty histogram is an error naming ``key``."""
    arr = as_array(value).astype(np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"histogram {key!r} is empty")
    return arr


def audio_batch(key: str, value: Any) -> np.ndarray:
    """``[N, T]`` float32 clips from ``[N, T]`` or ``[T]`` (values in [-1, 1])."""
    clips = as_array(value).astype(np.float32)
    clips = clips[None] if clips.ndim == 1 else clips
    if clips.ndim != 2:
        raise ValueError(f"audio {key!r} has shape {clips.shape}; expected [N, T] or [T]")
    return clips


def video_batch(key: str, value: Any) -> np.ndarray:
    """``[N, T, H, W, C]`` uint8 (floats in [0, 1])."""
    arr = as_array(value)
    if arr.ndim != 5:
        raise ValueError(f"video {key!r} has shape {arr.shape}; expected [N, T, H, W, C]")
    return _pixels(key, arr, "video")


@dataclasses.dataclass(frozen=True, eq=False)
class Histogram:
    """A histogram binned where the values live (on device): ``counts[i]`` values fell in
    ``[edges[i], edges[i + 1])``. fxtrain's writers take it in ``write_histograms`` wherever
    they take raw values, so a large tensor never has to be copied to the host to be plotted.

    Examples:
        >>> h = fx.logging.Histogram(edges=[0.0, 1.0, 2.0], counts=[3, 1])
        >>> h.centres.tolist(), h.counts.tolist()
        ([0.5, 1.5], [3.0, 1.0])
        >>> count, mean, std = h.moments()  # each value taken at its bin's centre
        >>> count, mean, round(std, 4)
        (4.0, 0.75, 0.433)
        >>> h.samples().tolist()  # for writers that bin raw values themselves
        [0.5, 0.5, 0.5, 1.5]
    """

    edges: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        edges = np.asarray(self.edges, dtype=np.float64).reshape(-1)
        counts = np.asarray(self.counts, dtype=np.float64).reshape(-1)
        if len(edges) != len(counts) + 1 or len(counts) == 0:
            raise ValueError(f"Histogram needs len(edges) == len(counts) + 1 >= 2, got "
                             f"{len(edges)} edges and {len(counts)} counts")
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "counts", counts)

    @classmethod
    def from_packed(cls, packed: Any) -> Histogram:
        """From ``[lo, hi, count_1, ..., count_n]`` (``fxtrain.stats.histograms``): n equal
        bins over ``[lo, hi]``.

        Examples:
            >>> weights = torch.tensor([0.0, 1.0, 1.5, 2.0])
            >>> packed = fx.stats.histograms({"w": weights}, bins=2)["w"]  # binned on device
            >>> h = fx.logging.Histogram.from_packed(packed)
            >>> h.edges.tolist(), h.counts.tolist()
            ([0.0, 1.0, 2.0], [1.0, 3.0])
        """
        return cls(*unpack_histogram(as_array(packed)))

    @property
    def centres(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    def sums(self) -> tuple[float, float, float]:
        """(count, sum, sum of squares), taking each value at its bin's centre."""
        centres = self.centres
        return (float(self.counts.sum()), float((centres * self.counts).sum()),
                float((centres ** 2 * self.counts).sum()))

    def moments(self) -> tuple[float, float, float]:
        """(count, mean, standard deviation), taking each value at its bin's centre."""
        n, total, squares = self.sums()
        if n == 0:
            return 0.0, math.nan, math.nan
        mean = total / n
        return n, mean, math.sqrt(max(squares / n - mean * mean, 0.0))

    def samples(self, max_samples: int = 100_000) -> np.ndarray:
        """Bin centres repeated by count (scaled down to about ``max_samples`` values): for
        writers that only bin raw values themselves, such as clu's."""
        counts = self.counts
        total = counts.sum()
        if total > max_samples:
            counts = counts * (max_samples / total)
        return np.repeat(self.centres, np.round(counts).astype(np.int64))


def buckets(num_buckets: int | Mapping[str, int] | None, key: str) -> int | None:
    """The bucket count for ``key``: clu passes one int for all keys or a mapping per key."""
    if isinstance(num_buckets, Mapping):
        return num_buckets.get(key)
    return num_buckets


def markdown_table(rows: Mapping[str, Any] | np.ndarray) -> str:
    """A markdown table of ``{key: value}`` or of a 2-D array (rows by columns).

    Examples:
        >>> from fxtrain.logging.values import markdown_table
        >>> print(markdown_table({"lr": 0.001, "model": "mlp"}))
        | key | value |
        |---|---|
        | lr | 0.001 |
        | model | "mlp" |
        >>> print(markdown_table(torch.tensor([[5, 1], [0, 4]]).numpy()))  # a confusion matrix
        | | 0 | 1 |
        |---|---|---|
        | **0** | 5 | 1 |
        | **1** | 0 | 4 |
    """
    if isinstance(rows, Mapping):
        body = "\n".join(f"| {k} | {json.dumps(v, default=str)} |" for k, v in rows.items())
        return "| key | value |\n|---|---|\n" + body
    arr = np.asarray(rows)
    head = "| |" + "".join(f" {j} |" for j in range(arr.shape[1])) + "\n"
    rule = "|---|" + "---|" * arr.shape[1] + "\n"
    body = "\n".join(f"| **{i}** |" + "".join(f" {x:.6g} |" for x in row)
                     for i, row in enumerate(arr.tolist()))
    return head + rule + body
