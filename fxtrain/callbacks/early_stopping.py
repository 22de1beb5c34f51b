"""``early_stopping``: stop when a monitored metric stops improving; optionally restore the best.

The counters are tensors in the state, updated with ``torch.where``, so the same callback runs on
the host (watching evaluation) or inside the compiled step (watching a step metric) without a
sync. The update is flax's ``EarlyStopping.update`` shape: a new value plus a flag.
"""

from __future__ import annotations


import torch

from .. import struct
from .core import Callback, Control, NOTHING, callback_state, set_callback_state

__all__ = ["EarlyStoppingState", "early_stopping", "monitored_value", "improvement"]


@struct.dataclass
class EarlyStoppingState:
    """``best`` value so far, evaluations since it (``wait``), ``stopped``, the step of the best
    value, and (with ``restore_best``) the parameters at that step."""

    best: torch.Tensor
    wait: torch.Tensor
    stopped: torch.Tensor
    best_step: torch.Tensor
    best_params: dict[str, torch.Tensor] | None = None


def monitored_value(event, monitor: str, device: torch.device) -> torch.Tensor:
    """``event.metrics[monitor]`` as a float64 tensor; a clear error if it is missing.

    Examples:
        >>> from fxtrain.callbacks.early_stopping import monitored_value
        >>> event = fx.Event("eval_end", 10, metrics={"loss": 0.5})
        >>> monitored_value(event, "loss", torch.device("cpu"))
        tensor(0.5000, dtype=torch.float64)
        >>> monitored_value(event, "accuracy", torch.device("cpu"))
        Traceback (most recent call last):
        ...
        KeyError: "monitored metric 'accuracy' is not in the eval_end metrics; available: ['loss']"
    """
    metrics = event.metrics or {}
    if monitor not in metrics:
        raise KeyError(f"monitored metric {monitor!r} is not in the {event.kind} metrics; "
                       f"available: {sorted(metrics)}")
    return torch.as_tensor(metrics[monitor], dtype=torch.float64, device=device)


def improvement(value: torch.Tensor, best: torch.Tensor, mode: str,
                min_delta: float) -> torch.Tensor:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never does).

    Examples:
        >>> from fxtrain.callbacks.early_stopping import improvement
        >>> best = torch.tensor(1.0)
        >>> improvement(torch.tensor(0.95), best, "min", 0.1)  # better, but by less than 0.1
        tensor(False)
        >>> improvement(torch.tensor(0.85), best, "min", 0.1)
        tensor(True)
        >>> improvement(torch.tensor(float("nan")), best, "min", 0.0)
        tensor(False)
    """
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _check(mode: str, patience: int, min_delta: float) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if patience < 0 or min_delta < 0:
        raise ValueError(f"patience and min_delta must be >= 0, got {patience}, {min_delta}")


def early_stopping(monitor: str = "loss", *, patience: int = 10, min_delta: float = 0.0,
                   mode: str = "min", restore_best: bool = False, event: str = "eval_end",
                   name: str = "early_stopping") -> Callback:
    """Stops after ``patience`` events in a row in which ``monitor`` did not improve.

    Args:
      monitor: the metric to watch in the events' metrics.
      patience: how many events in a row without improvement stop training.
      min_delta: the smallest change that counts as an improvement.
      mode: "min" (lower is better) or "max".
      restore_best: keep the best parameters in the callback state and put them back at train
        end (costs one copy of the parameters). Not at the stop itself: ``fit`` saves the state
        it stopped in, with the metrics of that state's evaluation, and resumes from it.
      event: the event kind it watches: "eval_end" (on the host, in ``fit``) or "step_end"
        (a step metric, also inside a compiled step).
      name: the key of its state in ``state.callbacks``.

    Once stopped it keeps asking to stop, on the host at train_begin too (a run resumed from a
    checkpoint saved after the stop ends at once), and inside a step it also asks to skip further
    updates, so the parameters stay where it stopped until the loop reads the flag.

    Examples:
        Evaluate after every step with a learning rate far too high: the evaluation loss only
        grows after the first, so training stops after two evaluations without improvement,
        and ``restore_best`` puts the best parameters back at the end:

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> eval_step = fx.make_eval_step(loss_fn)
        >>> stop = fx.callbacks.early_stopping("loss", patience=2, restore_best=True)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(1.5))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                max_steps=100, eval_step=eval_step, eval_data=[batch], eval_every=1,
        ...                callbacks=[stop])
        >>> es = fx.callbacks.callback_state(state, "early_stopping")
        >>> int(state.step), bool(es.stopped), int(es.best_step)
        (3, True, 1)
        >>> float(fx.evaluate(eval_step, state, [batch])["loss"]) == float(es.best)
        True
    """
    _check(mode, patience, min_delta)

    def init(state):
        device = state.step.device
        best_params = ({k: v.clone() for k, v in state.params.items()} if restore_best else None)
        return EarlyStoppingState(
            best=torch.tensor(float("inf") if mode == "min" else float("-inf"),
                              dtype=torch.float64, device=device),
            wait=torch.zeros((), dtype=torch.int64, device=device),
            stopped=torch.zeros((), dtype=torch.bool, device=device),
            best_step=torch.full((), -1, dtype=torch.int64, device=device),
            best_params=best_params)

    def restore(state, when: torch.Tensor, es: EarlyStoppingState):
        params = {k: torch.where(when, es.best_params[k], v) for k, v in state.params.items()}
        return state.replace(params=params)

    def update(state, ev):
        es = callback_state(state, name)
        value = monitored_value(ev, monitor, es.best.device)
        active = ~es.stopped
        better = improvement(value, es.best, mode, min_delta) & active
        wait = torch.where(better, 0, torch.where(active, es.wait + 1, es.wait))
        stop_now = active & ~better & (wait >= patience)
        step = torch.as_tensor(ev.step, dtype=torch.int64, device=es.best.device)
        new = EarlyStoppingState(
            best=torch.where(better, value, es.best), wait=wait, stopped=es.stopped | stop_now,
            best_step=torch.where(better, step, es.best_step),
            best_params=None if es.best_params is None else {
                k: torch.where(better, state.params[k], v) for k, v in es.best_params.items()})
        state = set_callback_state(state, name, new)
        skip = es.stopped if ev.kind == "step_end" else False
        return state, Control(stop=new.stopped, skip=skip)

    def fn(state, ev):
        if ev.kind == "train_begin":  # resumed from a run that had stopped: it stays stopped
            return state, Control(stop=callback_state(state, name).stopped)
        if ev.kind == "train_end":  # restore_best only: back to the best, if there was one
            es = callback_state(state, name)
            return restore(state, es.best_step >= 0, es), NOTHING
        return update(state, ev)

    kinds = ("train_begin", event) + (("train_end",) if restore_best else ())
    return Callback(name=name, init=init, fn=fn, kinds=kinds, skips=event == "step_end")
