"""``checkpoint_policy``: when to save. It asks ``fit`` for a save; ``fit``'s manager writes.

The policy is a pure callback, like any other: every ``every`` steps, every ``every_secs``
seconds (reading a clock, so on the host only), and after an evaluation whose ``monitor`` metric
improved (the best value so far lives in its state, so a resumed run
knows it). ``fit(..., checkpoint=manager)`` carries out the saves, passing that evaluation's
metrics so the manager's ``keep_best`` retention ranks the checkpoint; it also saves on any
callback's ``Control(save=True)``, at the end of training and on Ctrl-C, and never saves a state
that ``nan_guard`` flagged. (``fx.callbacks.checkpoint`` is its old name, kept for one release.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import struct
from . import combinators
from .combinators import every as every_n
from .core import Callback, Control, NOTHING, callback_state, set_callback_state
from .early_stopping import check_monitor, improvement, monitored_value

_SAVE = Control(save=True)


@struct.dataclass
class CheckpointPolicyState:
    """The best ``monitor`` value so far and the step it was seen at (-1: none yet)."""

    best: torch.Tensor
    best_step: torch.Tensor


def checkpoint_policy(every: int | None = None, *, every_secs: float | None = None,
                      monitor: str | None = None, mode: str = "min", min_delta: float = 0.0,
                      name: str = "checkpoint",
                      time_fn: Callable[[], float] = time.monotonic) -> Callback:
    """Asks for a checkpoint every ``every`` steps, every ``every_secs`` seconds and whenever
    ``monitor`` improves.

    Args:
      every: steps between periodic saves (None: none).
      every_secs: seconds between timed saves (None: none), measured by ``time_fn`` from the
        start of ``fit`` and from the last save of any kind (a periodic, best or final save
        restarts the clock, so a timed save never follows another save closely).
      monitor: an evaluation metric; each evaluation that improves it by more than
        ``min_delta`` asks for a save (None: none). With several evaluation sets it is
        ``<set>/<metric>`` (``"val/loss"``), as in ``early_stopping``.
      mode: "min" or "max": which way ``monitor`` improves.
      min_delta: the smallest change that counts as an improvement.
      name: the key of its state in ``state.callbacks``.
      time_fn: the clock for ``every_secs`` (injectable, for tests).

    With ``every_secs`` the policy reads the clock, so it runs on the host only (``fit``'s
    callbacks). Under torch.distributed each rank reads its own clock, and clocks drift, so
    no rank acts on its own reading: ``fit`` holds a timed request until its next agreed read
    of the control flags (every ``sync_every`` steps, or an eval or epoch boundary), where a
    request from any rank holds on every rank. Every rank thus saves at the same step, up to
    ``sync_every`` steps after the first rank's clock ran out, and every rank restarts its
    clock at that save. Alone (one process) a timed save happens at the step it is asked for.
    (A policy with ``every_secs`` is a host callback as a whole, so under torch.distributed
    its ``every`` saves wait for that agreed read too; give ``every`` a policy of its own,
    with another ``name``, to keep them on their exact steps.)

    Examples:
        A save every 5 steps and at each better evaluation (every 2 steps); with a learning
        rate far too high only the first evaluation is the best, and the manager keeps it:

        >>> import tempfile
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> policy = fx.callbacks.checkpoint_policy(every=5, monitor="loss")
        >>> saved = fx.callbacks.on("checkpoint", lambda s, e: print("saved", e.metrics["step"]))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(1.5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with fx.checkpoint.CheckpointManager(d, keep_latest=2, keep_best=1,
        ...                                          best_metric="loss") as manager:
        ...         state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                        max_steps=10, eval_step=fx.make_eval_step(loss_fn),
        ...                        eval_data=[batch], eval_every=2, checkpoint=manager,
        ...                        callbacks=[policy, saved])
        ...         print(manager.all_steps(), manager.best_step())
        saved 2
        saved 5
        saved 10
        [2, 5, 10] 2

        A save every minute, with a fake clock and steps of 25 s, folded by hand as ``fit``
        does (the clock starts at train_begin):

        >>> now = [0.0]
        >>> timed = fx.callbacks.checkpoint_policy(every_secs=60, time_fn=lambda: now[0])
        >>> _ = fx.callbacks.fold([timed], state, fx.Event("train_begin", 0))
        >>> for step in range(1, 8):
        ...     now[0] += 25.0
        ...     _, control = fx.callbacks.fold([timed], state, fx.Event("step_end", step))
        ...     print(step, control.save) if control.save else None
        3 True
        6 True
    """
    if every is None and every_secs is None and monitor is None:
        raise ValueError("checkpoint_policy: pass every=N, every_secs=S, monitor=<metric>, or "
                         "several of them")
    if every_secs is not None and not every_secs > 0:
        raise ValueError(f"checkpoint_policy: every_secs must be > 0, got {every_secs!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"checkpoint_policy: mode must be 'min' or 'max', got {mode!r}")
    if every is not None:
        combinators.periodic(every, "checkpoint_policy")  # names this callback in the error
    periodic = every_n(every, Callback(name, None, lambda state, event: (state, _SAVE),
                                       kinds=("step_end",))) if every is not None else None

    def init(state):
        device = state.step.device
        return CheckpointPolicyState(
            torch.tensor(float("inf") if mode == "min" else float("-inf"), dtype=torch.float64,
                         device=device),
            torch.full((), -1, dtype=torch.int64, device=device))

    def on_eval(state, event):
        policy = callback_state(state, name)
        value = monitored_value(event, monitor, policy.best.device)
        better = improvement(value, policy.best, mode, min_delta)
        step = torch.as_tensor(event.step, dtype=torch.int64, device=policy.best.device)
        new = CheckpointPolicyState(torch.where(better, value, policy.best),
                                    torch.where(better, step, policy.best_step))
        return set_callback_state(state, name, new), Control(save=better)

    timed = _Clock(every_secs, time_fn) if every_secs is not None else None

    def fn(state, event):
        if event.kind == "eval_end":
            return on_eval(state, event)
        if event.kind == "train_begin" and monitor is not None:
            check_monitor(name, monitor, event.metrics)
        if event.kind in ("train_begin", "checkpoint"):  # the clock starts (again)
            if timed is not None:
                timed.restart()
            return state, NOTHING
        state, control = periodic.fn(state, event) if periodic is not None else (state, NOTHING)
        return state, (control | _SAVE) if timed is not None and timed.due() else control

    kinds = (("step_end",) if every or every_secs else ()) + (("eval_end",) if monitor else ()) \
        + (("train_begin",) if every_secs is not None or monitor else ()) \
        + (("checkpoint",) if every_secs is not None else ())
    # period: on the host the fold calls it on step_end only at multiples of every (a timed
    # policy is called on every step_end, to read its clock)
    return Callback(name=name, init=init if monitor else None, fn=fn, kinds=kinds,
                    host=every_secs is not None,
                    period=periodic.period if periodic is not None and timed is None else 1)


class _Clock:
    """Whether ``seconds`` of ``time_fn`` passed since the last ``restart`` (or the first call),
    restarting when they did. Host-only: the time of the last save is not part of the state."""

    def __init__(self, seconds: float, time_fn: Callable[[], float]):
        self.seconds, self.time_fn, self.last = seconds, time_fn, None

    def restart(self) -> None:
        self.last = self.time_fn()

    def due(self) -> bool:
        now = self.time_fn()
        if self.last is None:  # outside fit (no train_begin): the clock starts here
            self.last = now
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False
