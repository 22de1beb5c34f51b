"""Ctrl-C (SIGINT) during ``fit`` waits for the step it lands in to end.

A step ``fit`` calls is given a state it may write into (donation: Adam's moments and the
parameters are updated in place, eagerly as the update goes, compiled as the graph runs), so a
``KeyboardInterrupt`` raised inside it could leave that state half at the next step's values,
and ``fit`` would then save it and hand it back as if it were whole. Inside the step, the first
SIGINT is held (with a line on stderr saying so) and raised as ``KeyboardInterrupt`` when the
step returns, where the state is whole; a second one raises at once (a step that hangs can
still be stopped), and ``fit`` then neither saves nor hands back the state the step was given.

As with SIGTERM (``fxtrain.loop._preemption``), the handler is installed only in the main
thread and only over Python's default one; a program with its own SIGINT handler keeps it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def after_the_step() -> Iterator[None]:
    """Holds the first SIGINT inside the block and raises ``KeyboardInterrupt`` once it ends
    (unless it raised); a second SIGINT raises at once."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        print("fxtrain: interrupted; stopping when this step ends (Ctrl-C again to stop at "
              "once, without saving)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
