"""Numbers out of metrics: which values are one number, reading them to Python floats with one
device sync, and formatting them; the floor every writer, host callback and checkpoint reads on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .._format import format_scalars as format_scalars  # torch-free, for the command line


def is_number(value: Any) -> bool:
    """Whether a metric is one number (a 0-d or one-element tensor or array, an int or a
    float), not a vector or a matrix (per-class values, a confusion matrix).

    Examples:
        >>> from fxtrain.logging.numbers import is_number
        >>> is_number(torch.tensor(0.5)), is_number(3), is_number(torch.ones(10))
        (True, True, False)
    """
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, int | float | np.number | np.ndarray) and np.size(value) == 1


def read_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Python floats of one-element tensors and numbers, with one device sync for all tensors.

    Examples:
        >>> from fxtrain.logging.numbers import read_floats
        >>> read_floats({"loss": torch.tensor(0.25), "lr": 1e-3})
        {'loss': 0.25, 'lr': 0.001}
    """
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: _number(k, v) for k, v in values.items() if k not in tensors}
    by_device: dict[torch.device, list[str]] = {}
    for k, t in tensors.items():
        if t.numel() != 1:
            raise ValueError(f"scalar {k!r} has shape {tuple(t.shape)}; expected one number "
                             "per key (many values are a histogram)")
        by_device.setdefault(t.device, []).append(k)
    for keys in by_device.values():  # one sync per device
        if len(keys) == 1:  # one read (a learning rate): no stack
            out[keys[0]] = float(tensors[keys[0]].item())
            continue
        stacked = torch.stack([tensors[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return {k: out[k] for k in values}


def _number(key: str, value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"scalar {key!r} must be one number, got {type(value).__name__}")
    return float(arr.reshape(()))


