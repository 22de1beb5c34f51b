"""Runs a Hugging Face ``transformers.TrainerCallback`` inside ``fx.fit``.

fxtrain events become the callback's hooks, called with real ``TrainingArguments``,
``TrainerState`` and ``TrainerControl`` objects; the flags it sets in the control become an
``fx.Control``. transformers is an optional dependency (``pip install fxtrain[hf]``), imported
when ``hf_callback`` is called.

Event to hooks:

=============  ==============================================================================
train_begin    on_train_begin, on_epoch_begin
step_end       on_step_begin, on_step_end, and on_log with the step's metrics as floats every
               ``log_every`` steps or when the callback set ``should_log``
eval_end       on_log and on_evaluate with ``{"eval_<name>": float}``; then ``best_metric``
               is updated as the Trainer does when ``metric_for_best_model`` is set
epoch_end      on_epoch_end, and on_epoch_begin unless it was the last epoch
checkpoint     on_save
train_end      on_train_end
=============  ==============================================================================

on_step_begin runs after the step (fit has no event before it); the ``model``, optimizer and
dataloader keyword arguments of the hooks are None (fxtrain keeps parameters in the state, not
in the module). ``should_training_stop``, ``should_save``, ``should_evaluate`` and ``should_log``
become ``stop``, ``save``, ``evaluate`` and ``log``; ``should_epoch_stop`` has no counterpart.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import distributed
from ..logging.numbers import read_floats
from .combinators import periodic
from .core import Callback, Control, callback_state, set_callback_state
from .publish import loggable

__all__ = ["hf_callback"]

# The TrainerState fields a resume needs; log_history is left out (it grows with the run).
_STATE_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size",
                 "logging_steps", "best_metric", "best_global_step", "best_model_checkpoint")
_NO_OBJECTS = dict(model=None, processing_class=None, optimizer=None, lr_scheduler=None,
                   train_dataloader=None, eval_dataloader=None)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fx.callbacks.hf_callback needs the transformers package: "
                          "pip install fxtrain[hf]") from e
    return transformers


def _place(args: Any, device: torch.device) -> None:
    """Gives ``args`` a device without ``accelerate``: its device set-up is a cached property,
    so a value in the instance dict is used instead of running it (no process group, no
    ``accelerate`` import). fxtrain places tensors itself; these fields are for reading."""
    args.__dict__.update(_setup_devices=device, _n_gpu=int(device.type == "cuda"),
                         distributed_state=None)


def _training_arguments(overrides: Any, log_every: int) -> tuple[Any, bool]:
    """``TrainingArguments`` from ``overrides`` (a mapping, or a ready instance kept as is)."""
    tf = _transformers()
    if isinstance(overrides, tf.TrainingArguments):
        return overrides, False
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError("hf_callback: args must be a dict of TrainingArguments fields or a "
                        f"TrainingArguments, got {type(overrides).__name__}")
    kw = {"report_to": "none", "eval_strategy": "steps", "save_strategy": "steps",
          "logging_steps": log_every, **(overrides or {})}
    # a name only: TrainingArguments wants one, fxtrain never writes there (and making a
    # directory per call, as mkdtemp did, left one behind each time)
    kw.setdefault("output_dir", os.path.join(tempfile.gettempdir(), "fxtrain_hf_unused"))
    args = tf.TrainingArguments.__new__(tf.TrainingArguments)
    _place(args, torch.device("cpu"))
    try:
        args.__init__(**kw)
    except TypeError as e:
        raise TypeError(f"hf_callback: bad TrainingArguments field in args: {e}") from e
    return args, True


@dataclasses.dataclass
class _Session:
    """The live transformers objects of one hf_callback; host-only, rebuilt from the state."""

    cb: Any
    args: Any
    state: Any
    control: Any
    own_args: bool
    steps_per_epoch: int | None = None

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

    def hook(self, method, **kw) -> None:
        """Calls one hook; like transformers' handler, a returned control replaces ours."""
        out = method(self.args, self.state, self.control, **_NO_OBJECTS, **kw)
        if out is not None:
            self.control = out

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control.should_log = False
        self.hook(self.cb.on_log, logs=logs)

    def requests(self) -> Control:
        """The control's flags as an ``fx.Control``; save/evaluate/log are handed over once."""
        c = self.control
        out = Control(stop=bool(c.should_training_stop), save=bool(c.should_save),
                      evaluate=bool(c.should_evaluate), log=bool(c.should_log))
        c.should_save = c.should_evaluate = c.should_log = False
        return out


def _train_begin(s: _Session, state, event) -> Control:
    plan = event.metrics or {}
    if s.own_args:
        _place(s.args, next(iter(state.params.values())).device)
    s.steps_per_epoch = plan.get("steps_per_epoch")
    s.state.max_steps = plan.get("max_steps") or 0
    s.state.num_train_epochs = plan.get("max_epochs") or 0
    s.state.train_batch_size = plan.get("batch_size")
    s.state.global_step, s.state.epoch = event.step, float(event.epoch)
    s.state.is_world_process_zero = distributed.is_rank_zero()
    s.state.is_local_process_zero = int(os.environ.get("LOCAL_RANK", distributed.rank())) == 0
    s.control.should_training_stop = False
    s.hook(s.cb.on_train_begin)
    s.control.should_epoch_stop = False
    s.hook(s.cb.on_epoch_begin)
    return s.requests()


def _step_end(s: _Session, event, due: Callable[[int], bool]) -> Control:
    s.state.global_step = event.step
    s.state.epoch = (event.step / s.steps_per_epoch if s.steps_per_epoch
                     else float(event.epoch))
    s.control.should_save = s.control.should_evaluate = s.control.should_log = False
    s.hook(s.cb.on_step_begin)
    s.hook(s.cb.on_step_end)
    asked = s.requests()
    if asked.log or due(event.step):  # the only read of the metrics: one sync
        s.log(read_floats(loggable(event.metrics)))
    return asked | s.requests()


def _best_metric(s: _Session, metrics: dict[str, float]) -> None:
    """Updates ``best_metric`` as the Trainer does after an evaluation."""
    key = s.args.metric_for_best_model
    if key is None:
        return
    key = key if key.startswith("eval_") else f"eval_{key}"
    if key not in metrics:
        raise KeyError(f"hf_callback: metric_for_best_model is {key!r} but the evaluation "
                       f"returned {sorted(metrics)}")
    value, best = metrics[key], s.state.best_metric
    if best is None or (value > best if s.args.greater_is_better else value < best):
        s.state.best_metric, s.state.best_global_step = value, s.state.global_step


def _eval_end(s: _Session, event) -> Control:
    s.state.global_step = event.step
    values = read_floats(event.metrics or {})
    metrics = {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in values.items()}
    s.log(metrics)
    s.control.should_evaluate = False
    s.hook(s.cb.on_evaluate, metrics=dict(metrics))
    _best_metric(s, metrics)
    return s.requests()


def _epoch_end(s: _Session, event) -> Control:
    s.state.epoch = float(event.epoch + 1)
    s.hook(s.cb.on_epoch_end)
    if not s.state.num_train_epochs or event.epoch + 1 < s.state.num_train_epochs:
        s.control.should_epoch_stop = False
        s.hook(s.cb.on_epoch_begin)
    return s.requests()


def _checkpoint(s: _Session, event) -> Control:
    info = event.metrics or {}
    if s.state.best_global_step is not None and s.state.best_global_step == info.get("step"):
        s.state.best_model_checkpoint = info.get("path")
    s.control.should_save = False
    s.hook(s.cb.on_save)
    return s.requests()


def _dispatch(s: _Session, state, event, due: Callable[[int], bool]) -> Control:
    if event.kind == "train_begin":
        return _train_begin(s, state, event)
    if event.kind == "step_end":
        return _step_end(s, event, due)
    if event.kind == "eval_end":
        return _eval_end(s, event)
    if event.kind == "epoch_end":
        return _epoch_end(s, event)
    if event.kind == "checkpoint":
        return _checkpoint(s, event)
    s.hook(s.cb.on_train_end)
    return s.requests()


def hf_callback(cb: Any, *, args: Any = None, name: str | None = None,
                log_every: int = 50) -> Callback:
    """Runs the ``transformers.TrainerCallback`` ``cb`` as an fxtrain host callback.

    The hooks see a ``TrainingArguments`` built from ``args`` (defaults: a temporary
    ``output_dir``, ``eval_strategy="steps"``, ``report_to="none"``; built without
    ``accelerate``), a ``TrainerState`` kept in step with the run, and a ``TrainerControl``
    whose flags become the returned ``fx.Control``. The callback's ``ExportableState``
    (``cb.state()``) and the TrainerState fields a resume needs (global_step, epoch,
    best_metric, ...) are this callback's state in ``state.callbacks``: JSON-like, so they are
    checkpointed, and a resumed run rebuilds the callback with ``type(cb).from_state``. The
    metrics are read (one device sync) only for on_log, every ``log_every`` steps, and at
    eval_end. See the module docstring for the event-to-hook table.

    Args:
      cb: a ``transformers.TrainerCallback`` instance.
      args: a dict of ``TrainingArguments`` fields (e.g. ``metric_for_best_model``), or a
        ``TrainingArguments`` used as is.
      name: the callback's name; default ``hf_<class name>``.
      log_every: steps between on_log calls with the train metrics.

    Unless ``args`` sets ``output_dir``, it names a directory that is never created: fxtrain
    writes nothing there, and a wrapped callback that writes files should be given its own.

    Returns:
      A host ``Callback`` whose state is a dict of Python values.

    Examples:
        transformers' early stopping on a run whose learning rate is far too high: the
        evaluation loss grows after the first, so it stops at step 3, after two evaluations
        without improvement.

        >>> import transformers
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> patience = transformers.EarlyStoppingCallback(early_stopping_patience=2)
        >>> stop = fx.callbacks.hf_callback(patience, args={"metric_for_best_model": "eval_loss"})
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(1.5))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                max_steps=100, eval_step=fx.make_eval_step(loss_fn),
        ...                eval_data=[batch], eval_every=1, callbacks=[stop])
        >>> int(state.step)
        3
        >>> saved = fx.callbacks.callback_state(state, "hf_EarlyStoppingCallback")  # checkpointed
        >>> saved["callback"]["attributes"], saved["trainer_state"]["best_global_step"]
        ({'early_stopping_patience_counter': 2}, 1)
    """
    tf = _transformers()
    if not isinstance(cb, tf.TrainerCallback):
        raise TypeError("hf_callback: cb must be a transformers.TrainerCallback instance, got "
                        f"{type(cb).__name__}")
    due = periodic(log_every, "hf_callback", "log_every")
    training_args, own_args = _training_arguments(args, log_every)
    session = _Session(cb, training_args, tf.TrainerState(logging_steps=log_every),
                       tf.TrainerControl(), own_args)
    initial = session.export()
    name = name or f"hf_{type(cb).__name__}"

    def init(state):
        del state
        return copy.deepcopy(initial)

    last = [None]  # the value this callback last left in a state: no need to compare it

    def fn(state, event):
        saved = callback_state(state, name)
        if saved is not last[0] and saved != session.export():  # a restored or different run
            session.restore(saved)
        control = _dispatch(session, state, event, due)
        new = session.export()
        if new != saved:
            state = set_callback_state(state, name, new)
        last[0] = callback_state(state, name)
        return state, control

    return Callback(name=name, init=init, fn=fn, host=True, kinds=(
        "train_begin", "step_end", "eval_end", "epoch_end", "checkpoint", "train_end"))
