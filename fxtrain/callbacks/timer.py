"""``timer``: stop training when a time budget is spent.

The elapsed training time lives in the state (``state.callbacks[name]["elapsed"]``, seconds),
so a resumed run keeps counting against the same budget. It is written at least once a second
and at every event other than step_end; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .core import NOTHING, Callback, Control, callback_state, set_callback_state

_STOP = Control(stop=True)


def timer(max_seconds: float, *, time_fn: Callable[[], float] = time.monotonic,
          name: str = "timer") -> Callback:
    """Asks to stop once training has run ``max_seconds`` in total (over resumes too).

    Examples:
        A fake clock on which 10 s pass between events, and a budget of 25 s:

        >>> import itertools
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> clock = itertools.count(0.0, 10.0)
        >>> timer = fx.callbacks.timer(25, time_fn=lambda: next(clock))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> train_step = fx.make_train_step(loss_fn)
        >>> state = fx.fit(state, train_step, data, max_steps=100, callbacks=[timer])
        fxtrain: stopped at step 3 by timer asked to stop
        >>> int(state.step), state.callbacks["timer"]  # train_end read the clock too
        (3, {'elapsed': 40.0})
        >>> state = fx.fit(state, train_step, data, max_steps=100, callbacks=[timer])
        fxtrain: stopped at step 3 by timer asked to stop
        >>> int(state.step)  # a resumed run counts against the same budget: none left
        3
    """
    if not max_seconds > 0:
        raise ValueError(f"timer: max_seconds must be > 0, got {max_seconds}")
    clock: dict[str, float] = {}  # this process: when it began, the state's elapsed then

    def init(state):
        del state
        return {"elapsed": 0.0}

    def fn(state, event):
        now = time_fn()
        if event.kind == "train_begin" or not clock:
            clock.update(begin=now, base=callback_state(state, name)["elapsed"], saved=now)
        elapsed = clock["base"] + now - clock["begin"]
        over = elapsed >= max_seconds
        if over or event.kind != "step_end" or now - clock["saved"] >= 1.0:
            clock["saved"] = now
            state = set_callback_state(state, name, {"elapsed": elapsed})
        return state, (_STOP if over else NOTHING)

    return Callback(name=name, init=init, fn=fn, host=True, kinds=(
        "train_begin", "step_end", "eval_end", "epoch_end", "checkpoint", "train_end"))
