"""How ``hf_callback`` turns fxtrain events into a ``transformers.TrainerCallback``'s hooks.

A ``Session`` holds the live transformers objects (the callback, ``TrainingArguments``,
``TrainerState``, ``TrainerControl``); ``dispatch`` calls the hooks one event asks for, in the
Trainer's order (the table is in ``fxtrain.callbacks.hf``), and returns the control's requests.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import distributed
from ..logging.numbers import read_floats
from .core import NOTHING, Control
from .hf_views import place, views
from .publish import loggable

# The TrainerState fields a resume needs; log_history is left out (it grows with the run).
_STATE_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size",
                 "logging_steps", "best_metric", "best_global_step", "best_model_checkpoint")
# The flags transformers' CallbackHandler clears before it calls each hook.
_CLEARS = {"on_train_begin": ("should_training_stop",), "on_epoch_begin": ("should_epoch_stop",),
           "on_step_begin": ("should_log", "should_evaluate", "should_save"),
           "on_evaluate": ("should_evaluate",), "on_save": ("should_save",),
           "on_log": ("should_log",)}
_NO_OBJECTS = {"processing_class": None, "train_dataloader": None, "eval_dataloader": None}
# ends without the Trainer's _finalize_training: its train() raised
_ABORTED = ("error", "interrupted")


def trainer_key(name: str) -> str:
    """An evaluation metric of fit's as the Trainer names it: ``loss`` -> ``eval_loss``, and
    a set's ``val/loss`` -> ``eval_val_loss`` (the Trainer's ``eval_<dataset>_<metric>`` for
    an ``eval_dataset`` dict)."""
    return name if name.startswith("eval_") else "eval_" + name.replace("/", "_")


def best_key(args: Any) -> str:
    """``metric_for_best_model`` as the evaluation reports it (``eval_<name>``)."""
    return trainer_key(args.metric_for_best_model)


@dataclasses.dataclass
class Session:
    """The live transformers objects of one hf_callback; host-only, rebuilt from the state."""

    cb: Any
    args: Any
    state: Any
    control: Any
    own_args: bool
    checkpoint: Any = None
    objects: dict = dataclasses.field(default_factory=dict)  # model, optimizer, lr_scheduler
    steps_per_epoch: int | None = None
    eval_batches: int | None = None
    made: bool = False  # on_init_end was called
    epoch_open: bool = False  # on_epoch_begin was called, on_epoch_end not yet
    began: tuple[float, int] = (0.0, 0)  # time and step of the latest train_begin

    @property
    def accumulation(self) -> int:
        return self.args.gradient_accumulation_steps

    def export(self) -> dict[str, Any]:
        """The callback's ``ExportableState`` and the TrainerState fields a resume needs."""
        from transformers.trainer_callback import ExportableState

        exportable = isinstance(self.cb, ExportableState)
        return {"callback": copy.deepcopy(self.cb.state()) if exportable else None,
                "trainer_state": {f: getattr(self.state, f) for f in _STATE_FIELDS}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        if saved["callback"] is not None:
            self.cb = type(self.cb).from_state(copy.deepcopy(saved["callback"]))
        for f, value in saved["trainer_state"].items():
            setattr(self.state, f, value)

    def hook(self, name: str, **kw) -> None:
        """Calls one hook as transformers' CallbackHandler does: it first clears the flags that
        hook hands over, and a returned control replaces ours."""
        for flag in _CLEARS.get(name, ()):
            setattr(self.control, flag, False)
        out = getattr(self.cb, name)(self.args, self.state, self.control, **self.objects,
                                     **_NO_OBJECTS, **kw)
        if out is not None:
            self.control = out

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.hook("on_log", logs=logs)

    def requests(self) -> Control:
        """The control's flags as an ``fx.Control``; save/evaluate/log are handed over once."""
        c = self.control
        out = Control(stop=bool(c.should_training_stop), save=bool(c.should_save),
                      evaluate=bool(c.should_evaluate), log=bool(c.should_log),
                      stop_epoch=bool(c.should_epoch_stop),
                      abort=bool(getattr(c, "should_abort_without_save", False)))  # Forgather's
        c.should_save = c.should_evaluate = c.should_log = c.should_epoch_stop = False
        return out


def _train_begin(s: Session, state, event) -> Control:
    plan = event.metrics or {}
    if s.own_args:
        place(s.args, next(iter(state.params.values())).device)
    if not s.made:
        s.made = True
        s.hook("on_init_end")
    k = s.accumulation
    s.steps_per_epoch, s.eval_batches = plan.get("steps_per_epoch"), plan.get("eval_batches")
    max_steps, max_epochs, per_epoch = (plan.get("max_steps"), plan.get("max_epochs"),
                                        s.steps_per_epoch)
    if max_steps is None and max_epochs and per_epoch:
        max_steps = max_epochs * per_epoch
    s.state.max_steps = (max_steps or 0) // k
    s.state.num_train_epochs = max_epochs or (-(-max_steps // per_epoch) if max_steps and
                                              per_epoch else 0)
    s.state.train_batch_size = plan.get("batch_size")
    s.state.global_step, s.state.epoch = event.step // k, _epoch(s, event)
    s.state.is_world_process_zero = distributed.is_rank_zero()
    s.state.is_local_process_zero = int(os.environ.get("LOCAL_RANK", distributed.rank())) == 0
    s.began = (time.perf_counter(), event.step)
    s.hook("on_train_begin")
    return s.requests()


def _epoch(s: Session, event) -> float:
    """The Trainer's fractional epoch: micro-steps done over the micro-steps of an epoch."""
    return event.step / s.steps_per_epoch if s.steps_per_epoch else float(event.epoch)


def _epoch_begin(s: Session, event) -> Control:
    s.state.epoch, s.epoch_open = _epoch(s, event), True
    s.hook("on_epoch_begin")
    return s.requests()


def _step_begin(s: Session, event) -> Control:
    s.state.global_step = event.step // s.accumulation
    if event.step % s.accumulation == 0:  # the first micro-step of an optimizer step
        s.hook("on_step_begin")
    return s.requests()


def _step_end(s: Session, event, due: Callable[[int], bool]) -> Control:
    steps, rest = divmod(event.step, s.accumulation)
    if rest:
        s.state.global_step, s.state.epoch = steps, _epoch(s, event)
        s.hook("on_substep_end")
        return s.requests()
    s.state.global_step = steps - 1  # the update is under way
    s.hook("on_pre_optimizer_step")
    s.hook("on_optimizer_step")
    s.state.global_step, s.state.epoch = steps, _epoch(s, event)
    s.hook("on_step_end")
    asked = s.requests()
    if asked.log or due(steps):  # the only read of the metrics: one sync
        s.log(read_floats(loggable(event.metrics)))
    return asked | s.requests()


def _best_metric(s: Session, metrics: dict[str, float]) -> None:
    """Updates ``best_metric`` as the Trainer does after an evaluation."""
    if s.args.metric_for_best_model is None:
        return
    key = best_key(s.args)
    if key not in metrics:
        raise KeyError(f"hf_callback: metric_for_best_model is {key!r} but the evaluation "
                       f"returned {sorted(metrics)}")
    value, best = metrics[key], s.state.best_metric
    if best is None or (value > best if s.args.greater_is_better else value < best):
        s.state.best_metric, s.state.best_global_step = value, s.state.global_step


def _eval_end(s: Session, event) -> Control:
    s.state.global_step = event.step // s.accumulation
    for _ in range(s.eval_batches or 0):
        s.hook("on_prediction_step")
    values = read_floats(event.metrics or {})
    metrics = {trainer_key(k): v for k, v in values.items()}
    s.log(metrics)
    s.hook("on_evaluate", metrics=dict(metrics))
    _best_metric(s, metrics)
    return s.requests()


def _epoch_end(s: Session, event) -> Control:
    s.state.epoch, s.epoch_open = float(event.epoch + 1), False
    s.hook("on_epoch_end")
    return s.requests()


def _checkpoint(s: Session, event) -> Control:
    """on_save. As in the Trainer, the best model's checkpoint is the best step's, when that
    step was saved (steps in the state's count: optimizer steps times the accumulation)."""
    info, best = event.metrics or {}, s.state.best_global_step
    if best is not None:
        step = best * s.accumulation
        if step == info.get("step"):
            s.state.best_model_checkpoint = info.get("path")
        elif s.checkpoint is not None and step in s.checkpoint.all_steps():
            s.state.best_model_checkpoint = str(s.checkpoint.directory / str(step))
    s.hook("on_save")
    return s.requests()


def _load_best(s: Session, state):
    """``state`` with the weights of the best checkpoint (the Trainer's _load_best_model)."""
    path = s.state.best_model_checkpoint
    if path is None:
        warnings.warn(
            "hf_callback: load_best_model_at_end: no checkpoint was saved at the best "
            f"evaluation (step {s.state.best_global_step}), so the final weights stay; save at "
            "every evaluation (checkpoint_policy(every=eval_every))", stacklevel=4)
        return state
    step = int(Path(path).name)
    if step not in s.checkpoint.all_steps():
        raise FileNotFoundError(f"hf_callback: load_best_model_at_end: the best checkpoint "
                                f"(step {step}) is no longer in {s.checkpoint.directory}")
    best = s.checkpoint.restore(state, step, only=("params", "buffers"))
    s.objects = views(best)
    return best


def _train_end(s: Session, state, event) -> tuple[Any, Control]:
    if (event.metrics or {}).get("reason") in _ABORTED:
        return state, NOTHING
    if s.epoch_open:  # the Trainer ends the epoch a stop interrupts
        s.epoch_open = False
        s.hook("on_epoch_end")
    seconds, steps = time.perf_counter() - s.began[0], (event.step - s.began[1]) // s.accumulation
    s.log({"train_runtime": round(seconds, 4),
           "train_steps_per_second": round(steps / seconds, 3) if seconds > 0 else 0.0})
    if s.args.load_best_model_at_end:
        state = _load_best(s, state)
    s.hook("on_train_end")
    return state, s.requests()


def _predict_end(s: Session, event) -> Control:
    values = read_floats(event.metrics or {})
    for _ in range(int(values.get("batches", 0))):
        s.hook("on_prediction_step")
    s.hook("on_predict", metrics={f"test_{k}": v for k, v in values.items()})
    return s.requests()


_HANDLERS = {"epoch_begin": _epoch_begin, "step_begin": _step_begin, "eval_end": _eval_end,
             "epoch_end": _epoch_end, "checkpoint": _checkpoint, "predict_end": _predict_end}


def dispatch(s: Session, state, event, due: Callable[[int], bool]) -> tuple[Any, Control]:
    """Calls the hooks ``event`` asks for; returns the state (train_end may restore the best
    weights) and the control's requests."""
    if event.kind == "train_end":
        return _train_end(s, state, event)
    if event.kind == "train_begin":
        return state, _train_begin(s, state, event)
    if event.kind == "step_end":
        return state, _step_end(s, event, due)
    if event.kind == "exception":  # the Trainer has no hook for it
        return state, NOTHING
    return state, _HANDLERS[event.kind](s, event)
