"""Where host monitors send their readings: a writer with ``write_scalars``, else the log.

A writer is anything with clu's ``write_scalars(step, mapping)`` (fxtrain's writers, clu's).
Without one, readings go to the ``fxtrain`` logger as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import distributed

__all__ = ["publish", "read_floats", "format_scalars", "logger", "loggable",
           "check_writer"]

logger = logging.getLogger("fxtrain")


_NOT_LOGGED = ("control/", "grad_hist/")  # the loop's flags; model_watch's histograms


def loggable(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The step metrics that are logged as numbers: all but the in-step control flags and the
    gradient histograms (``grad_hist/*``, written by ``model_watch``)."""
    return {k: v for k, v in (metrics or {}).items() if not k.startswith(_NOT_LOGGED)}


def is_number(value: Any) -> bool:
    """Whether a metric is one number (a 0-d or one-element tensor or array, an int or a
    float), not a vector or a matrix (per-class values, a confusion matrix)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, int | float | np.number | np.ndarray) and np.size(value) == 1


def read_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Python floats of one-element tensors and numbers, with one device sync for all tensors."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: _number(k, v) for k, v in values.items() if k not in tensors}
    by_device: dict[torch.device, list[str]] = {}
    for k, t in tensors.items():
        if t.numel() != 1:
            raise ValueError(f"scalar {k!r} has shape {tuple(t.shape)}; expected one number "
                             "per key (many values are a histogram)")
        by_device.setdefault(t.device, []).append(k)
    for keys in by_device.values():  # one sync per device
        stacked = torch.stack([tensors[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return {k: out[k] for k in values}


def _number(key: str, value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"scalar {key!r} must be one number, got {type(value).__name__}")
    return float(arr.reshape(()))


def publish(writer: Any, step: int, scalars: Mapping[str, float], *, what: str) -> None:
    """Sends ``scalars`` to ``writer.write_scalars``, or logs them as ``what: k=v ...``; on
    rank 0 only under torch.distributed."""
    if distributed.rank() != 0:
        return
    if writer is not None:
        writer.write_scalars(step, dict(scalars))
        return
    if logger.isEnabledFor(logging.INFO):
        logger.info("step %d %s: %s", step, what, format_scalars(scalars))


def format_scalars(scalars: Mapping[str, float], sep: str = " ") -> str:
    """``name=value`` pairs with 4 significant digits."""
    return sep.join(f"{k}={v:.4g}" for k, v in scalars.items())


def check_writer(writer: Any, who: str, *methods: str) -> None:
    """Raises a TypeError naming what ``writer`` lacks of ``methods``."""
    missing = [m for m in methods if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(f"{who}: {type(writer).__name__} is not a writer: it has no "
                        f"{', '.join(missing)} (use fx.logging.TensorBoardWriter, JsonlWriter, "
                        "ConsoleWriter, or any clu MetricWriter)")
