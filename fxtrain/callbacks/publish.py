"""Where host monitors send their readings: a writer with ``write_scalars``, else the log.
(Which step metrics are logged as numbers is ``fxtrain.metrics._means.loggable``, kept here too.)

A writer is anything with clu's ``write_scalars(step, mapping)`` (fxtrain's writers, clu's).
Without one, readings go to the ``fxtrain`` logger as one line when logging is set up, else to
the console (standard error, above any progress bar).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from .. import distributed
from ..logging.numbers import format_scalars
from ..metrics._means import loggable as loggable

logger = logging.getLogger("fxtrain")


@distributed.rank_zero
def publish(writer: Any, step: int, scalars: Mapping[str, float], *, what: str) -> None:
    """Sends ``scalars`` to ``writer.write_scalars``, or writes ``step N what: k=v ...`` to the
    ``fxtrain`` logger when logging is set up, else to standard error; on rank 0 only under
    torch.distributed.

    Examples:
        >>> from fxtrain.callbacks.publish import publish
        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, scalars)
        >>> publish(Show(), 10, {"memory/cpu_rss_mib": 512.0}, what="memory")
        10 {'memory/cpu_rss_mib': 512.0}
        >>> publish(None, 10, {"memory/cpu_rss_mib": 512.0}, what="memory")  # log or stderr
    """
    if writer is not None:
        writer.write_scalars(step, dict(scalars))
        return
    line = f"step {step} {what}: {format_scalars(scalars)}"
    if logger.hasHandlers():  # logging is set up (here or at the root): it decides
        if logger.isEnabledFor(logging.INFO):
            logger.info("%s", line)
    else:  # nothing set up, where logging would drop INFO: the console, as Keras prints
        console_line(line)


def console_line(line: str) -> None:
    """Writes ``line`` to standard error: above the progress bars drawn on the console
    (``tqdm.write`` clears and redraws them), directly when none is (a bar drawn to a file)."""
    out = sys.stderr
    if any(_on_console(bar, out) for bar in list(getattr(tqdm, "_instances", ()))):
        tqdm.write(line, file=out)
    else:
        out.write(line + "\n")


def _on_console(bar: Any, out: Any) -> bool:
    """Whether tqdm would clear ``bar`` to write to ``out``: it draws there, or both are the
    terminal's standard streams."""
    fp = getattr(bar, "fp", None)
    return fp == out or (fp in (sys.stdout, sys.stderr) and out in (sys.stdout, sys.stderr))
