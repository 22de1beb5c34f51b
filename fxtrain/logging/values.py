"""Turning what users log (tensors, numpy arrays, Python numbers) into host values, with the
checks every writer shares: finite scalars, image and video shapes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..callbacks.report import read_floats

__all__ = ["as_array", "scalars", "image_batch", "video_batch"]

_warned: set[str] = set()


def as_array(value: Any) -> np.ndarray:
    """A numpy array of ``value`` (a tensor on any device, an array or a number)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16 or value.dtype.is_floating_point and value.itemsize < 4:
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def scalars(mapping: Mapping[str, Any]) -> dict[str, float]:
    """``{key: float}`` (device tensors read in one transfer per device); a non-finite value is
    kept (as NaN or inf) and warned about once per key."""
    out = read_floats(mapping)
    for k, x in out.items():
        if not math.isfinite(x) and k not in _warned:
            _warned.add(k)
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
    """``[N, H, W, C]`` uint8 from ``[N, H, W, C]`` or ``[H, W, C]`` (floats in [0, 1])."""
    arr = as_array(value)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"image {key!r} has shape {arr.shape}; expected [N, H, W, C] or "
                         "[H, W, C] (channels last)")
    return _pixels(key, arr, "image")


def video_batch(key: str, value: Any) -> np.ndarray:
    """``[N, T, H, W, C]`` uint8 (floats in [0, 1])."""
    arr = as_array(value)
    if arr.ndim != 5:
        raise ValueError(f"video {key!r} has shape {arr.shape}; expected [N, T, H, W, C]")
    return _pixels(key, arr, "video")
