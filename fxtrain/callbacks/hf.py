"""Runs a Hugging Face ``transformers.TrainerCallback`` inside ``fx.fit``.

fxtrain events become the callback's hooks, called in the order ``transformers.Trainer`` calls
them, with real ``TrainingArguments``, ``TrainerState`` and ``TrainerControl`` objects; the
flags the callback sets in the control become an ``fx.Control``. transformers is an optional
dependency (``pip install fxtrain[hf]``), imported when ``hf_callback`` is called.

Event to hooks (the Trainer's places: ``Trainer.__init__``, ``_inner_training_loop``,
``_run_epoch``, ``_maybe_log_save_evaluate``, ``evaluate``/``evaluation_loop``,
``_finalize_training`` and ``predict`` in transformers/trainer.py):

==============  ===============================================================================
train_begin     on_init_end (the first run of this hf_callback; the Trainer calls it when it
                is made), on_train_begin
epoch_begin     on_epoch_begin
step_begin      on_step_begin (at the first micro-step of an optimizer step)
step_end        on_pre_optimizer_step, on_optimizer_step, on_step_end, then on_log with the
                step's metrics as floats every ``log_every`` optimizer steps or when the
                callback set ``should_log``; on an accumulation micro-step, on_substep_end
eval_end        on_prediction_step once per evaluation batch, on_log and on_evaluate with
                ``{"eval_<name>": float}``; then ``best_metric`` is updated as the Trainer does
                when ``metric_for_best_model`` is set
epoch_end       on_epoch_end
checkpoint      on_save
train_end       on_epoch_end if the last epoch stopped part-way (the Trainer ends every epoch
                it began), on_log with ``train_runtime`` and ``train_steps_per_second``, the
                best checkpoint's weights back (``load_best_model_at_end``), on_train_end
exception       none: the Trainer calls no hook when training raises, nor on_train_end (so
                the train_end of an error or a Ctrl-C calls none either)
predict_end     on_prediction_step once per batch, on_predict (``fx.predict``)
==============  ===============================================================================

Where fxtrain has no event at the Trainer's place, the hook runs at the nearest place that keeps
the Trainer's order:

- on_pre_optimizer_step and on_optimizer_step run at step_end, before on_step_end: the update
  happens inside the compiled step. ``state.global_step`` is the count before the update in
  them, as in the Trainer.
- on_prediction_step runs at eval_end (and predict_end), once per batch, before on_log: the
  evaluation loop has no per-batch event. The count of evaluation batches comes from
  ``len(eval_data)``; data without a length gets none.
- on_init_end runs at the first train_begin, not when ``hf_callback`` is made (the hooks need
  the state).
- An epoch's last step that saves: the Trainer calls on_save, then on_epoch_end; ``fit`` ends the
  epoch before it saves, so on_epoch_end comes first. Evaluations come before both, as in the
  Trainer.
- A step made with ``steps_per_call=K`` shows the host one step_begin and one step_end per call,
  so the per-step hooks run once per K steps.

Gradient accumulation: with ``args={"gradient_accumulation_steps": k}`` (and an optimizer made
with ``fx.optim.multi_steps(tx, every_k=k)``), fxtrain's steps are micro-steps, and
``state.global_step`` counts optimizer steps (fxtrain's step divided by k), as the Trainer's.

The hooks get ``model``: ``fx.trained_module(state)``, built on first use (it copies the
weights), a snapshot that later steps do not change and whose changes do not reach the state;
``optimizer`` with ``param_groups`` (the current learning rate as ``"lr"``, the injected
hyperparameters) and ``lr_scheduler`` with ``get_last_lr()`` (see ``fxtrain.callbacks.hf_views``).
``processing_class`` and the dataloaders are None.

``should_training_stop``, ``should_save``, ``should_evaluate`` and ``should_log`` become
``stop``, ``save``, ``evaluate`` and ``log``. ``should_epoch_stop`` cannot be honoured: ``fit``
ends an epoch only when its data does; the first time a callback sets it, a warning says so.
``load_best_model_at_end`` restores the weights (params and buffers) of the best checkpoint of
the ``CheckpointManager`` given as ``checkpoint`` at train_end, before on_train_end, and the
returned state holds them; without a manager that keeps that checkpoint it is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..logging.numbers import read_floats
from .combinators import periodic
from .core import EVENT_KINDS, NOTHING, Callback, Control, set_callback_state
from .hf_views import views
from .publish import loggable

__all__ = ["hf_callback"]

# The TrainerState fields a resume needs; log_history is left out (it grows with the run).
_STATE_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size",
                 "logging_steps", "best_metric", "best_global_step", "best_model_checkpoint")
# The flags transformers' CallbackHandler clears before it calls each hook.
_CLEARS = {"on_train_begin": ("should_training_stop",), "on_epoch_begin": ("should_epoch_stop",),
           "on_step_begin": ("should_log", "should_evaluate", "should_save"),
           "on_evaluate": ("should_evaluate",), "on_save": ("should_save",),
           "on_log": ("should_log",)}
_NO_OBJECTS = dict(processing_class=None, train_dataloader=None, eval_dataloader=None)
# ends without the Trainer's _finalize_training: its train() raised
_ABORTED = ("error", "interrupted")


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


def _best_key(args: Any) -> str:
    """``metric_for_best_model`` as the evaluation reports it (``eval_<name>``)."""
    key = args.metric_for_best_model
    return key if key.startswith("eval_") else f"eval_{key}"


def _check_best(args: Any, checkpoint: Any) -> None:
    """``load_best_model_at_end`` needs a manager that keeps the best checkpoint by the same
    metric: the checkpoints are fit's, ranked by the evaluation metrics saved with them."""
    if not args.load_best_model_at_end:
        return
    name = _best_key(args)[len("eval_"):]
    mode = "max" if args.greater_is_better else "min"
    if checkpoint is None:
        raise ValueError(
            "hf_callback: args has load_best_model_at_end=True, which puts the best checkpoint "
            "back at the end; pass the CheckpointManager that fit saves with: "
            "hf_callback(cb, args=..., checkpoint=manager) and fit(..., checkpoint=manager), "
            f"with CheckpointManager(directory, keep_best=1, best_metric={name!r}, "
            f"best_mode={mode!r})")
    kept = (checkpoint.keep_best, checkpoint.best_metric, checkpoint.best_mode)
    if kept[0] < 1 or kept[1:] != (name, mode):
        raise ValueError(
            f"hf_callback: load_best_model_at_end ranks checkpoints by {name!r} ({mode}), but "
            f"the CheckpointManager keeps keep_best={kept[0]} by best_metric={kept[1]!r} "
            f"({kept[2]}), so the best checkpoint may be deleted; make it with "
            f"CheckpointManager(directory, keep_best=1, best_metric={name!r}, "
            f"best_mode={mode!r})")


@dataclasses.dataclass
class _Session:
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
    warned: bool = False  # about should_epoch_stop

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
                      evaluate=bool(c.should_evaluate), log=bool(c.should_log))
        c.should_save = c.should_evaluate = c.should_log = False
        if c.should_epoch_stop and not self.warned:
            self.warned = True
            warnings.warn(f"hf_callback: {type(self.cb).__name__} set should_epoch_stop, which "
                          "fx.fit cannot honour (an epoch ends when its data does); the epoch "
                          "goes on. Set should_training_stop to end training", stacklevel=5)
        return out


def _train_begin(s: _Session, state, event) -> Control:
    plan = event.metrics or {}
    if s.own_args:
        _place(s.args, next(iter(state.params.values())).device)
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


def _epoch(s: _Session, event) -> float:
    """The Trainer's fractional epoch: micro-steps done over the micro-steps of an epoch."""
    return event.step / s.steps_per_epoch if s.steps_per_epoch else float(event.epoch)


def _epoch_begin(s: _Session, event) -> Control:
    s.state.epoch, s.epoch_open = _epoch(s, event), True
    s.hook("on_epoch_begin")
    return s.requests()


def _step_begin(s: _Session, event) -> Control:
    s.state.global_step = event.step // s.accumulation
    if event.step % s.accumulation == 0:  # the first micro-step of an optimizer step
        s.hook("on_step_begin")
    return s.requests()


def _step_end(s: _Session, event, due: Callable[[int], bool]) -> Control:
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


def _best_metric(s: _Session, metrics: dict[str, float]) -> None:
    """Updates ``best_metric`` as the Trainer does after an evaluation."""
    if s.args.metric_for_best_model is None:
        return
    key = _best_key(s.args)
    if key not in metrics:
        raise KeyError(f"hf_callback: metric_for_best_model is {key!r} but the evaluation "
                       f"returned {sorted(metrics)}")
    value, best = metrics[key], s.state.best_metric
    if best is None or (value > best if s.args.greater_is_better else value < best):
        s.state.best_metric, s.state.best_global_step = value, s.state.global_step


def _eval_end(s: _Session, event) -> Control:
    s.state.global_step = event.step // s.accumulation
    for _ in range(s.eval_batches or 0):
        s.hook("on_prediction_step")
    values = read_floats(event.metrics or {})
    metrics = {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in values.items()}
    s.log(metrics)
    s.hook("on_evaluate", metrics=dict(metrics))
    _best_metric(s, metrics)
    return s.requests()


def _epoch_end(s: _Session, event) -> Control:
    s.state.epoch, s.epoch_open = float(event.epoch + 1), False
    s.hook("on_epoch_end")
    return s.requests()


def _checkpoint(s: _Session, event) -> Control:
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


def _load_best(s: _Session, state):
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


def _train_end(s: _Session, state, event) -> tuple[Any, Control]:
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


def _predict_end(s: _Session, event) -> Control:
    values = read_floats(event.metrics or {})
    for _ in range(int(values.get("batches", 0))):
        s.hook("on_prediction_step")
    s.hook("on_predict", metrics={f"test_{k}": v for k, v in values.items()})
    return s.requests()


def _dispatch(s: _Session, state, event, due: Callable[[int], bool]) -> tuple[Any, Control]:
    kind = event.kind
    if kind == "train_end":
        return _train_end(s, state, event)
    if kind == "train_begin":
        return state, _train_begin(s, state, event)
    if kind == "exception":  # the Trainer has no hook for it
        return state, NOTHING
    handlers = {"epoch_begin": _epoch_begin, "step_begin": _step_begin,
                "eval_end": _eval_end, "epoch_end": _epoch_end, "checkpoint": _checkpoint,
                "predict_end": _predict_end}
    if kind == "step_end":
        return state, _step_end(s, event, due)
    return state, handlers[kind](s, event)


def hf_callback(cb: Any, *, args: Any = None, name: str | None = None, log_every: int = 50,
                checkpoint: Any = None) -> Callback:
    """Runs the ``transformers.TrainerCallback`` ``cb`` as an fxtrain host callback.

    Its hooks are called in the order ``transformers.Trainer`` calls them (the module docstring
    has the event-to-hook table). They see a ``TrainingArguments`` built from ``args``
    (defaults: ``eval_strategy="steps"``, ``report_to="none"``; built without
    ``accelerate``), a ``TrainerState`` kept in step with the run, a ``TrainerControl`` whose
    flags become the returned ``fx.Control``, and ``model``, ``optimizer`` and
    ``lr_scheduler`` read from the state (``model`` is ``fx.trained_module(state)``, made only
    when a hook uses it). The callback's ``ExportableState`` (``cb.state()``) and the
    TrainerState fields a resume needs (global_step, epoch, best_metric, ...) are this
    callback's state in ``state.callbacks``: JSON-like, so they are checkpointed, and a resumed
    run rebuilds the callback with ``type(cb).from_state``. The metrics are read (one device
    sync) only for on_log, every ``log_every`` steps, and at eval_end.

    Args:
      cb: a ``transformers.TrainerCallback`` instance.
      args: a dict of ``TrainingArguments`` fields (e.g. ``metric_for_best_model``), or a
        ``TrainingArguments`` used as is.
      name: the callback's name; default ``hf_<class name>``.
      log_every: optimizer steps between on_log calls with the train metrics.
      checkpoint: the ``fx.checkpoint.CheckpointManager`` that ``fit`` saves with; needed by
        ``load_best_model_at_end``, which it must keep (``keep_best>=1``, ``best_metric`` the
        ``metric_for_best_model`` without ``eval_``, ``best_mode`` as ``greater_is_better``).

    Unless ``args`` sets ``output_dir``, it names a directory that is never created: fxtrain
    writes nothing there, and a wrapped callback that writes files should be given its own.

    Returns:
      A host ``Callback`` whose state is a dict of Python values; it takes every event kind,
      step_begin included.

    Raises:
      TypeError: ``cb`` is not a ``TrainerCallback``, or ``args`` is not a dict of
        ``TrainingArguments`` fields.
      ValueError: ``load_best_model_at_end`` without a ``checkpoint`` that keeps the best.

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

        A callback that saves the model the Trainer's way, at the end:

        >>> import tempfile
        >>> class SaveAtEnd(transformers.TrainerCallback):
        ...     def on_train_end(self, args, state, control, model=None, **kw):
        ...         model.save_pretrained(args.output_dir)  # no-op for a plain nn.Module
        ...         print(type(model).__name__, state.global_step)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                max_steps=5, callbacks=[fx.callbacks.hf_callback(
        ...                    SaveAtEnd(), args={"output_dir": tmp.name})])
        Linear 5
        >>> tmp.cleanup()
    """
    tf = _transformers()
    if not isinstance(cb, tf.TrainerCallback):
        raise TypeError("hf_callback: cb must be a transformers.TrainerCallback instance, got "
                        f"{type(cb).__name__}")
    due = periodic(log_every, "hf_callback", "log_every")
    training_args, own_args = _training_arguments(args, log_every)
    _check_best(training_args, checkpoint)
    session = _Session(cb, training_args, tf.TrainerState(logging_steps=log_every),
                       tf.TrainerControl(), own_args, checkpoint)
    initial = session.export()
    name = name or f"hf_{type(cb).__name__}"

    def init(state):
        del state
        return copy.deepcopy(initial)

    last = [None]  # the value this callback last left in a state: no need to compare it

    def fn(state, event):
        saved = (state.callbacks or {}).get(name)  # None: a state fit never ran with it
        if saved is not None and saved is not last[0] and saved != session.export():
            session.restore(saved)  # a restored or different run
        session.objects = views(state)
        state, control = _dispatch(session, state, event, due)
        session.objects = {}
        new = session.export()
        if saved is not None and new != saved:
            state = set_callback_state(state, name, new)
        last[0] = (state.callbacks or {}).get(name)
        return state, control

    return Callback(name=name, init=init, fn=fn, kinds=EVENT_KINDS, host=True)
