"""Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before they kill) during ``fit``.

``fit`` catches SIGTERM while it runs: the handler only raises a flag. The loop reads it with
its other control flags (at once in one process; at the next flag read, within
``sync_every`` steps, under torch.distributed, where the ranks agree on it so every rank
stops at the same step), saves a checkpoint of that step, sends train_end with reason
``"preempted"`` and raises ``Preempted``: a ``SystemExit`` with code 143 (128 + SIGTERM),
so an uncaught one ends the process quietly with the code schedulers read as "terminated".
The run resumes from that checkpoint like any other.

The handler is installed only in the main thread and only over the default action; a
program with its own SIGTERM handler keeps it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Preempted(SystemExit):
    """SIGTERM ended ``fit``: the state was saved (when ``fit`` had a checkpoint manager) and is
    in ``.state``; uncaught, the process exits with code 143.

    Examples:
        >>> e = fx.Preempted(state=None)
        >>> e.code, isinstance(e, SystemExit)
        (143, True)
    """

    def __init__(self, state: Any):
        super().__init__(EXIT_CODE)
        self.state = state


@contextlib.contextmanager
def on_sigterm(raise_flag: Callable[[], None]) -> Iterator[bool]:
    """Calls ``raise_flag()`` on SIGTERM inside the block (instead of dying); yields whether the
    handler is installed (not outside the main thread, nor over another handler)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield False
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: raise_flag())
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous)
