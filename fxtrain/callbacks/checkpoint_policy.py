"""``checkpoint_policy``: when to save. It asks ``fit`` for a save; ``fit``'s manager writes.

The policy is a pure callback, like any other: every ``every`` steps, and after an evaluation
whose ``monitor`` metric improved (the best value so far lives in its state, so a resumed run
knows it). ``fit(..., checkpoint=manager)`` carries out the saves, passing that evaluation's
metrics so the manager's ``keep_best`` retention ranks the checkpoint; it also saves on any
callback's ``Control(save=True)``, at the end of training and on Ctrl-C, and never saves a state
that ``nan_guard`` flagged. (``fx.callbacks.checkpoint`` is its old name, kept for one release.)
"""

from __future__ import annotations

import torch

from .. import struct
from . import combinators
from .combinators import every as every_n
from .core import Callback, Control, NOTHING, callback_state, set_callback_state
from .early_stopping import improvement, monitored_value

__all__ = ["CheckpointPolicyState", "checkpoint_policy"]

_SAVE = Control(save=True)


@struct.dataclass
class CheckpointPolicyState:
    """The best ``monitor`` value so far and the step it was seen at (-1: none yet)."""

    best: torch.Tensor
    best_step: torch.Tensor


def checkpoint_policy(every: int | None = None, *, monitor: str | None = None, mode: str = "min",
                      min_delta: float = 0.0, name: str = "checkpoint") -> Callback:
    """Asks for a checkpoint every ``every`` steps and whenever ``monitor`` improves.

    Args:
      every: steps between periodic saves (None: none).
      monitor: an evaluation metric; each evaluation that improves it by more than
        ``min_delta`` asks for a save (None: none).
      mode: "min" or "max": which way ``monitor`` improves.
      min_delta: the smallest change that counts as an improvement.
      name: the key of its state in ``state.callbacks``.

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
    """
    if every is None and monitor is None:
        raise ValueError("checkpoint_policy: pass every=N, monitor=<metric>, or both")
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

    def fn(state, event):
        if event.kind == "eval_end":
            return on_eval(state, event)
        return periodic.fn(state, event) if periodic is not None else (state, NOTHING)

    kinds = (("step_end",) if every else ()) + (("eval_end",) if monitor else ())
    # period: on the host the fold calls it on step_end only at multiples of every
    return Callback(name=name, init=init if monitor else None, fn=fn, kinds=kinds,
                    period=periodic.period if periodic is not None else 1)
