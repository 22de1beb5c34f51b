"""Where host monitors send their readings: a writer with ``write_scalars``, else the log.
(Which step metrics are logged as numbers is ``fxtrain.means.loggable``, kept here too.)

A writer is anything with clu's ``write_scalars(step, mapping)`` (fxtrain's writers, clu's).
Without one, readings go to the ``fxtrain`` logger as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .. import distributed
from ..logging.numbers import format_scalars
from ..means import loggable as loggable

logger = logging.getLogger("fxtrain")


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
