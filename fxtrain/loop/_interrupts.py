"""Ctrl-C (SIGINT) during ``fit`` waits for the step it lands in to end.

A step ``fit`` calls is given a state it may write into (donation: Adam's moments and the
parameters are updated in place, eagerly as the update goes, compiled as the graph runs), so a
``KeyboardInterrupt`` raised inside it could leave that state half at the next step's values,
and ``fit`` would then save it and hand it back as if it were whole. Inside the step, the first
SIGINT is held (with a line on stderr saying so) and raised as ``KeyboardInterrupt`` when the
step returns, where the state is whole; a second one raises at once (a step that hangs can
still be stopped), and ``fit`` then neither saves nor hands back the state the step was given.

As with SIGTERM (``fxtrain.loop._preemption``), the handler is installed once per ``fit``, only
in the main thread and only over Python's default one; a program with its own SIGINT handler
keeps it. Outside a step it raises at once, as Python's default handler does.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def held_in_steps(progress: Any) -> Iterator[None]:
    """For the whole of one ``fit``: the first SIGINT that lands while ``progress.in_step`` is
    held (``progress.interrupted`` set, and raised by ``raise_held`` once the step returns);
    a second one inside the step, or any outside a step, raises ``KeyboardInterrupt`` at once,
    as Python's own handler does. Installed once per ``fit``, not around every step (two
    handler swaps per step were a fifth of ``fit``'s own cost on a small model)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def hold(signum: int, frame: object) -> None:
        if not progress.in_step or progress.interrupted:
            raise KeyboardInterrupt
        progress.interrupted = True
        print("fxtrain: interrupted; stopping when this step ends (Ctrl-C again to stop at "
              "once, without saving)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def raise_held(progress: Any) -> None:
    """After a step returned (the state whole again): the SIGINT held in it, if any."""
    if progress.interrupted:
        raise KeyboardInterrupt
