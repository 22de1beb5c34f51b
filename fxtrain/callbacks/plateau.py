"""``reduce_lr_on_plateau``: lower the learning rate when a metric stops improving.

The learning rate must be an injected hyperparameter
(``fx.optim.inject_hyperparams(fx.optim.adam)(learning_rate=1e-3)``); the callback scales
``opt_state.hyperparams["learning_rate"]`` in the state, so the compiled step picks the new value
up without a recompile. A learning rate injected as a schedule is recomputed at every update
and would undo the change: inject a number.
"""

from __future__ import annotations

import torch

from .. import struct
from ..optim.wrappers import injected_hyperparam, map_hyperparams
from .core import Callback, NOTHING, callback_state, set_callback_state
from .early_stopping import eval_end_name, check_monitor, improvement, monitored_value


@struct.dataclass
class PlateauState:
    """Best value, events since it, remaining cooldown, and how many reductions so far."""

    best: torch.Tensor
    wait: torch.Tensor
    cooldown: torch.Tensor
    reductions: torch.Tensor


def reduce_lr_on_plateau(monitor: str = "loss", *, factor: float = 0.1, patience: int = 10,
                         min_delta: float = 0.0, mode: str = "min", cooldown: int = 0,
                         min_lr: float = 0.0, event: str = "eval_end",
                         name: str = "reduce_lr_on_plateau") -> Callback:
    """Multiplies the learning rate by ``factor`` when ``monitor`` stops improving.

    Counts as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with ``threshold_mode="abs"``:
    the rate drops on the event after ``patience`` events in a row without improvement.

    Args:
      monitor: the metric to watch; mode "min" or "max"; min_delta as in ``early_stopping``.
      factor: the multiplier, in (0, 1).
      patience: events without improvement that are tolerated.
      cooldown: events to wait after a reduction before counting again.
      min_lr: the learning rate never goes below this.
      event: "eval_end" (host) or "step_end" (also inside a compiled step).
      name: the key of its state in ``state.callbacks``.

    Examples:
        Evaluation losses that stop improving after the second, fed to the callback directly
        (``fx.fit`` does this at each evaluation):

        >>> tx = fx.optim.inject_hyperparams(fx.optim.adam)(learning_rate=1e-3)
        >>> plateau = fx.callbacks.reduce_lr_on_plateau("loss", factor=0.5, patience=1)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), tx, callbacks=[plateau])
        >>> for step, loss in enumerate([1.0, 0.8, 0.8, 0.9, 0.8, 0.8], start=1):
        ...     event = fx.Event("eval_end", step, metrics={"loss": loss})
        ...     state, _ = fx.callbacks.fold([plateau], state, event)
        ...     print(step, loss, f"{float(fx.optim.learning_rate(state.opt_state)):.2g}")
        1 1.0 0.001
        2 0.8 0.001
        3 0.8 0.001
        4 0.9 0.0005
        5 0.8 0.0005
        6 0.8 0.00025
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_lr_on_plateau: factor must be in (0, 1), got {factor}")
    if mode not in ("min", "max") or patience < 0 or cooldown < 0:
        raise ValueError("reduce_lr_on_plateau: mode must be 'min'/'max', patience and "
                         "cooldown >= 0")

    def init(state):
        injected_hyperparam(state.opt_state, "learning_rate")  # raises, naming what to do
        zero = torch.zeros((), dtype=torch.int64, device=state.step.device)
        inf = float("inf") if mode == "min" else float("-inf")
        return PlateauState(torch.tensor(inf, dtype=torch.float64, device=state.step.device),
                            zero, zero.clone(), zero.clone())

    def fn(state, ev):
        if ev.kind == "train_begin":  # a monitor naming no evaluation set: refused at once
            check_monitor("reduce_lr_on_plateau", eval_end_name(monitor, event), ev.metrics)
            return state, NOTHING
        ps = callback_state(state, name)
        value = monitored_value(ev, monitor, ps.best.device)
        better = improvement(value, ps.best, mode, min_delta)
        wait = torch.where(better, 0, ps.wait + 1)
        cooling = ps.cooldown > 0
        wait = torch.where(cooling, 0, wait)
        reduce = wait > patience
        new = PlateauState(torch.where(better, value, ps.best), torch.where(reduce, 0, wait),
                           torch.where(reduce, cooldown, ps.cooldown - cooling.long()),
                           ps.reductions + reduce.long())

        def scaled(lr):
            return torch.where(reduce, (lr * factor).clamp_min(min_lr), lr)

        state = state.replace(opt_state=map_hyperparams(state.opt_state, "learning_rate", scaled))
        state = set_callback_state(state, name, new)
        return state, NOTHING

    return Callback(name=name, init=init, fn=fn, kinds=("train_begin", event))
