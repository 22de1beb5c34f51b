"""``early_stopping``: stop when a monitored metric stops improving; optionally restore the best.

The counters are tensors in the state, updated with ``torch.where``, so the same callback runs on
the host (watching evaluation) or inside the compiled step (watching a step metric) without a
sync. The update is flax's ``EarlyStopping.update`` shape: a new value plus a flag.
"""

from __future__ import annotations

import math

import torch

from .. import struct
from .core import Callback, Control, NOTHING, callback_state, set_callback_state


@struct.dataclass
class EarlyStoppingState:
    """``best`` value so far, evaluations since it (``wait``), ``stopped``, the step of the best
    value, and (with ``restore_best``) the parameters at that step."""

    best: torch.Tensor
    wait: torch.Tensor
    stopped: torch.Tensor
    best_step: torch.Tensor
    best_params: dict[str, torch.Tensor] | None = None


def _stop_reason(s: EarlyStoppingState):
    """What ``fit`` says when a run it stopped ends (read only then)."""
    return s.stopped, lambda: (f"no improvement since step {int(s.best_step)} "
                               f"(best {float(s.best):.6g})")


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


def check_monitor(who: str, monitor: str, plan, what: str = "monitor") -> None:
    """At train_begin (``plan``: its metrics), refuses an evaluation ``monitor`` that names none
    of the sets ``fit`` evaluates when ``eval_data`` is a dict of them (``plan["eval_sets"]``):
    their metrics are ``<set>/<metric>``, so the monitor starts with a set's name. ``what``:
    the monitor's name in the error.

    Examples:
        >>> from fxtrain.callbacks.early_stopping import check_monitor
        >>> plan = {"eval_sets": ["val", "test"]}
        >>> check_monitor("early_stopping", "test/loss", plan)  # fine
        >>> check_monitor("early_stopping", "tst/loss", plan)
        Traceback (most recent call last):
        ...
        ValueError: early_stopping: monitor 'tst/loss' names no evaluation set of fit's; fit
        evaluates the sets ['val', 'test'], whose metrics are named '<set>/<metric>' (e.g.
        'val/loss')
    """
    sets = (plan or {}).get("eval_sets")
    if not sets or not monitor or ("/" in monitor and monitor.split("/", 1)[0] in sets):
        return
    hint = ""
    if monitor.startswith("eval/") and monitor.split("/")[1] in sets:
        hint = (f"; the eval_end metrics have no 'eval/' (the writers add it): {what} "
                f"{monitor.removeprefix('eval/')!r}")
    raise ValueError(f"{who}: {what} {monitor!r} names no evaluation set of fit's; fit "
                     f"evaluates the sets {list(sets)}, whose metrics are named "
                     f"'<set>/<metric>' (e.g. '{sets[0]}/loss'){hint}")


def eval_end_name(monitor: str, event: str) -> str:
    """The ``eval_end`` name ``monitor`` reads on ``event`` (``epoch_end`` carries the epoch's
    last evaluation as ``eval/<name>``); the empty string, which no set check refuses, for a
    monitor of training metrics."""
    if event == "eval_end":
        return monitor
    return monitor.removeprefix("eval/") if event == "epoch_end" and \
        monitor.startswith("eval/") else ""


def improvement(value: torch.Tensor, best: torch.Tensor, mode: str,
                min_delta: float) -> torch.Tensor:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never does), computed
    as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` does (``value < best - min_delta``).

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


def _beats(value: torch.Tensor, reference: torch.Tensor, mode: str,
           min_delta: float) -> torch.Tensor:
    """``improvement`` computed as Keras and Lightning do (``value + min_delta < reference``),
    so the rounding at the edge of ``min_delta`` matches theirs."""
    return value + min_delta < reference if mode == "min" else value - min_delta > reference


_MIN_DELTA_MODES = ("keras", "transformers")


def _check(mode: str, patience: int, min_delta: float, min_delta_mode: str,
           baseline: float | None) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if patience < 0 or min_delta < 0:
        raise ValueError(f"patience and min_delta must be >= 0, got {patience}, {min_delta}")
    if min_delta_mode not in _MIN_DELTA_MODES:
        raise ValueError(f"min_delta_mode must be one of {_MIN_DELTA_MODES}, got "
                         f"{min_delta_mode!r}")
    if baseline is not None and not math.isfinite(baseline):
        raise ValueError(f"baseline must be a finite number or None, got {baseline!r}")


def _judge(value: torch.Tensor, es: EarlyStoppingState, mode: str, min_delta: float,
           min_delta_mode: str, baseline: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_best, patient)``: whether ``value`` becomes the best, and whether it resets the
    patience (it beats the best by more than ``min_delta``, and the baseline when there is one).
    """
    if min_delta_mode == "keras":
        patient = new_best = _beats(value, es.best, mode, min_delta)
    else:  # transformers: np.less(value, best) and abs(value - best) > threshold
        new_best = _beats(value, es.best, mode, 0.0)
        patient = new_best & ((value - es.best).abs() > min_delta)
    if baseline is not None:
        patient = patient & _beats(value, torch.full_like(value, baseline), mode, min_delta)
    return new_best, patient


def early_stopping(monitor: str = "loss", *, patience: int = 10, min_delta: float = 0.0,
                   mode: str = "min", min_delta_mode: str = "keras",
                   baseline: float | None = None, check_finite: bool = False,
                   restore_best: bool = False, event: str = "eval_end",
                   name: str = "early_stopping") -> Callback:
    """Stops after ``patience`` events in a row in which ``monitor`` did not improve.

    Args:
      monitor: the metric to watch in the events' metrics. With several evaluation sets
        (``fit(..., eval_data={"val": ..., "test": ...})``) an evaluation metric is
        ``<set>/<metric>`` (``"test/loss"``); ``fit`` refuses at train_begin a monitor that
        names none of its sets. On epoch_end the evaluation's metrics are ``eval/<set>/<metric>``.
      patience: how many events in a row without improvement stop training.
      min_delta: the smallest change that counts as an improvement.
      mode: "min" (lower is better) or "max".
      min_delta_mode: what ``min_delta`` gates (see below): "keras" (the default; Keras's,
        Lightning's and flax's ``min_delta``) or "transformers" (Hugging Face's
        ``EarlyStoppingCallback(early_stopping_threshold=...)``).
      baseline: a value the metric must beat (by more than ``min_delta``, as Keras's
        ``baseline``): an event resets the patience only when it improves on the best *and*
        beats the baseline, so a run that does not beat the baseline within ``patience``
        events stops. (Keras checks the patience only on events that do not improve the
        best, so a run that improves slowly above its baseline runs on; here every event counts.)
      check_finite: stop at once when the monitored value is NaN or infinite (Lightning's
        ``check_finite``; such a value changes neither the best nor the count, and inside a
        step its update is skipped). Off by default: a NaN then counts as an event without
        improvement.
      restore_best: keep the best parameters in the callback state and put them back at train
        end (costs one copy of the parameters). Not at the stop itself: ``fit`` saves the state
        it stopped in, with the metrics of that state's evaluation, and resumes from it.
      event: the event kind it watches: "eval_end" (on the host, in ``fit``) or "step_end"
        (a step metric, also inside a compiled step).
      name: the key of its state in ``state.callbacks``.

    The two ``min_delta_mode`` rules differ in when the best value moves:

    - "keras": the best moves only on an improvement by more than ``min_delta``, and such an
      improvement resets the patience. A slow steady descent of ``min_delta / 2`` per event
      still resets it every other event, measured from the last real improvement.
    - "transformers": the best follows every strict improvement, however small; the patience
      resets only on an improvement by more than ``min_delta`` over the previous best. The
      same slow descent never resets it.

    With ``min_delta=0.05``, ``patience=3`` and an evaluation every 10 steps of the losses
    1.00, 0.97, 0.94, 0.91, 0.88, 0.89, 0.90, 0.91: "keras" takes 0.94 (beats 1.00 by 0.06)
    and 0.88 (beats 0.94 by 0.06) as improvements and stops at step 80, three evaluations
    after 0.88; "transformers" moves its best to 0.97, 0.94, 0.91 but never by more than 0.05,
    so it stops at step 40. (With ``min_delta=0`` the two are the same rule.)

    Once stopped it keeps asking to stop, on the host at train_begin too (a run resumed from a
    checkpoint saved after the stop ends at once), and inside a step it also asks to skip further
    updates, so the parameters stay where it stopped until the loop reads the flag.

    Examples:
        The sequence above, folded by hand (what ``fit`` does after each evaluation):

        >>> losses = [1.00, 0.97, 0.94, 0.91, 0.88, 0.89, 0.90, 0.91]
        >>> def first_stop(cb):
        ...     state = fx.callbacks.init([cb], fx.TrainState.create(nn.Linear(2, 1),
        ...                                                          fx.optim.sgd(0.1)))
        ...     for step, loss in zip(range(10, 90, 10), losses):
        ...         event = fx.Event("eval_end", step, metrics={"loss": loss})
        ...         state, control = fx.callbacks.fold([cb], state, event)
        ...         if control.stop:
        ...             return step
        >>> first_stop(fx.callbacks.early_stopping(patience=3, min_delta=0.05))
        80
        >>> first_stop(fx.callbacks.early_stopping(patience=3, min_delta=0.05,
        ...                                        min_delta_mode="transformers"))
        40
        >>> first_stop(fx.callbacks.early_stopping(patience=3, baseline=0.8))  # never below it
        30

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
        fxtrain: stopped at step 3 by early_stopping: no improvement since step 1 (best ...)
        >>> es = fx.callbacks.callback_state(state, "early_stopping")
        >>> int(state.step), bool(es.stopped), int(es.best_step)
        (3, True, 1)
        >>> float(fx.evaluate(eval_step, state, [batch])["loss"]) == float(es.best)
        True
    """
    _check(mode, patience, min_delta, min_delta_mode, baseline)

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
        if check_finite:  # a non-finite value stops at once and changes nothing else
            finite = torch.isfinite(value)
            active, broken = active & finite, active & ~finite
        else:
            broken = torch.zeros_like(active)
        new_best, patient = _judge(value, es, mode, min_delta, min_delta_mode, baseline)
        new_best, patient = new_best & active, patient & active
        wait = torch.where(patient, 0, torch.where(active, es.wait + 1, es.wait))
        stop_now = broken | (active & ~patient & (wait >= patience))
        step = torch.as_tensor(ev.step, dtype=torch.int64, device=es.best.device)
        new = EarlyStoppingState(
            best=torch.where(new_best, value, es.best), wait=wait,
            stopped=es.stopped | stop_now, best_step=torch.where(new_best, step, es.best_step),
            best_params=None if es.best_params is None else {
                k: torch.where(new_best, state.params[k], v) for k, v in es.best_params.items()})
        state = set_callback_state(state, name, new)
        skip = (es.stopped | broken) if ev.kind == "step_end" else False
        return state, Control(stop=new.stopped, skip=skip)

    def fn(state, ev):
        if ev.kind == "train_begin":  # resumed from a run that had stopped: it stays stopped
            check_monitor(name, eval_end_name(monitor, event), ev.metrics)
            return state, Control(stop=callback_state(state, name).stopped)
        if ev.kind == "train_end":  # restore_best only: back to the best, if there was one
            es = callback_state(state, name)
            return restore(state, es.best_step >= 0, es), NOTHING
        return update(state, ev)

    kinds = ("train_begin", event) + (("train_end",) if restore_best else ())
    return Callback(name=name, init=init, fn=fn, kinds=kinds, skips=event == "step_end",
                    stop_reason=_stop_reason)
