"""``grad_monitor``: gradient norms, per layer, with vanishing and exploding gradient alerts.

Inside a compiled step it keeps the latest norms and counts vanishing/exploding steps in its
state (tensor maths, no sync). On the host (in ``fit``) it also reads the norms when due, in
one sync, logs a warning naming the layers that vanish or explode, and publishes the norms to a
writer or the log. Per-layer norms come from the step's ``grad_norm/<name>`` metrics: passing
the monitor to ``make_train_step`` turns them on; on the host, build the step with
``grad_stats=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import struct
from . import combinators
from .core import Callback, NOTHING, callback_state, set_callback_state
from ..logging.numbers import read_floats
from .publish import logger, publish

_SUMMARY = ("grad_norm", "grad_norm_max", "grad_norm_min", "grad_norm_mean")


@struct.dataclass
class GradMonitorState:
    """The latest norms (total, max, min, mean and per layer) and alert counts."""

    norms: dict[str, torch.Tensor]
    vanishing: torch.Tensor
    exploding: torch.Tensor


def _layer_norms(metrics, per_layer: bool) -> dict[str, torch.Tensor]:
    names = [k for k in metrics if k.startswith("grad_norm/")] if per_layer else []
    wanted = [k for k in _SUMMARY if per_layer or k == "grad_norm"] + names
    missing = [k for k in wanted if k not in metrics]
    if missing or (per_layer and not names):
        raise KeyError(
            f"grad_monitor needs the step's gradient norms {missing or ['grad_norm/<name>']}; "
            "build the step with make_train_step(..., grad_stats=True) or pass grad_monitor to "
            f"make_train_step. Available metrics: {sorted(metrics)}")
    return {k: metrics[k] for k in wanted}


def _alerts(floats: dict[str, float], vanishing: float, exploding: float) -> tuple[list, list]:
    layers = {k: v for k, v in floats.items() if k.startswith("grad_norm/")} or floats
    low = [k.removeprefix("grad_norm/") for k, v in layers.items() if v < vanishing]
    high = [k.removeprefix("grad_norm/") for k, v in layers.items() if not v <= exploding]
    return low, high


def grad_monitor(every: int = 1, *, per_layer: bool = True, vanishing: float = 1e-7,
                 exploding: float = 1e3, writer: Any = None,
                 name: str = "grad_monitor") -> Callback:
    """Tracks gradient norms every ``every`` steps and flags vanishing or exploding gradients.

    Args:
      every: steps between readings.
      per_layer: also track each parameter's gradient norm.
      vanishing: a norm below this is vanishing (per layer when per_layer, else the total).
      exploding: a norm above this (or non-finite) is exploding.
      writer: on the host, where the norms go (``write_scalars``); default the log.
      name: the key of its state in ``state.callbacks``.

    Returns:
      A callback whose state holds ``norms`` and the ``vanishing``/``exploding`` step counts.

    Examples:
        Inside the step, where it turns the per-layer norms on:

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(8, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> monitor = fx.callbacks.grad_monitor(2)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), callbacks=[monitor])
        >>> train_step = fx.make_train_step(loss_fn, callbacks=[monitor])
        >>> for _ in range(4):
        ...     state, metrics = train_step(state, batch)
        >>> gm = fx.callbacks.callback_state(state, "grad_monitor")
        >>> sorted(gm.norms)
        ['grad_norm', 'grad_norm/bias', 'grad_norm/weight', 'grad_norm_max', 'grad_norm_mean',
         'grad_norm_min']
        >>> torch.equal(gm.norms["grad_norm"], metrics["grad_norm"])  # step 4's
        True
        >>> int(gm.vanishing), int(gm.exploding)  # steps with alerts
        (0, 0)

        On the host (the step built with ``grad_stats=True``) it also publishes the norms:

        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, sorted(scalars)[:3])
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn, grad_stats=True), [batch] * 4,
        ...                max_epochs=1, callbacks=[fx.callbacks.grad_monitor(2, writer=Show())])
        2 ['grad_norm', 'grad_norm/bias', 'grad_norm/weight']
        4 ['grad_norm', 'grad_norm/bias', 'grad_norm/weight']
    """
    def init(state):
        device = state.step.device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        keys = list(_SUMMARY if per_layer else _SUMMARY[:1])
        keys += [f"grad_norm/{k}" for k in state.params] if per_layer else []
        count = torch.zeros((), dtype=torch.int64, device=device)
        return GradMonitorState({k: zero.clone() for k in keys}, count, count.clone())

    def update(state, event):
        gm = callback_state(state, name)
        norms = {k: torch.as_tensor(v).to(torch.float32) for k, v in
                 _layer_norms(event.metrics, per_layer).items()}
        stacked = torch.stack([v for k, v in norms.items() if k.startswith("grad_norm/")]
                              or [norms["grad_norm"]])
        low = (stacked < vanishing).any()
        high = ~(stacked <= exploding).all()
        new = GradMonitorState(norms, gm.vanishing + low.long(), gm.exploding + high.long())
        return set_callback_state(state, name, new), new

    def report(step: int, new: GradMonitorState) -> None:
        floats = read_floats(new.norms)
        low, high = _alerts(floats, vanishing, exploding)
        if low:
            logger.warning("step %d: vanishing gradients (norm < %g) in %s", step, vanishing, low)
        if high:
            logger.warning("step %d: exploding gradients (norm > %g) in %s", step, exploding, high)
        publish(writer, step, floats, what="gradients")

    def fn(state, event):
        new_state, new = update(state, event)
        if isinstance(event.step, int):  # on the host: warn and publish as well
            report(event.step, new)
        return new_state, NOTHING

    return combinators.every(every, Callback(name, init, fn, kinds=("step_end",), grad_stats=per_layer))

