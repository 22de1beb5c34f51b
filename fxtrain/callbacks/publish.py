"""Where host monitors send their readings: a writer with ``write_scalars``, else the log;
and which step metrics are logged as numbers.

A writer is anything with clu's ``write_scalars(step, mapping)`` (fxtrain's writers, clu's).
Without one, readings go to the ``fxtrain`` logger as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .. import distributed
from ..logging.numbers import format_scalars

__all__ = ["publish", "logger", "loggable"]

logger = logging.getLogger("fxtrain")


_NOT_LOGGED = ("control/", "grad_hist/")  # the loop's flags; model_watch's histograms


def loggable(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The step metrics that are logged as numbers: all but the in-step control flags and the
    gradient histograms (``grad_hist/*``, written by ``model_watch``).

    Examples:
        >>> from fxtrain.callbacks.publish import loggable
        >>> metrics = {"loss": torch.tensor(0.5), "control/stop": torch.tensor(False),
        ...            "grad_hist/weight": torch.zeros(66)}
        >>> loggable(metrics)
        {'loss': tensor(0.5000)}
    """
    return {k: v for k, v in (metrics or {}).items() if not k.startswith(_NOT_LOGGED)}


@distributed.rank_zero
def publish(writer: Any, step: int, scalars: Mapping[str, float], *, what: str) -> None:
    """Sends ``scalars`` to ``writer.write_scalars``, or logs them as ``what: k=v ...``; on
    rank 0 only under torch.distributed.

    Examples:
        >>> from fxtrain.callbacks.publish import publish
        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, scalars)
        >>> publish(Show(), 10, {"memory/cpu_rss_mib": 512.0}, what="memory")
        10 {'memory/cpu_rss_mib': 512.0}
        >>> publish(None, 10, {"memory/cpu_rss_mib": 512.0}, what="memory")  # to the log
    """
    if writer is not None:
        writer.write_scalars(step, dict(scalars))
        return
    if logger.isEnabledFor(logging.INFO):
        logger.info("step %d %s: %s", step, what, format_scalars(scalars))
