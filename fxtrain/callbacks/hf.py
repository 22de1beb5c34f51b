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
                ``{"eval_<name>": float}`` (a set's ``val/loss`` as ``eval_val_loss``, the
                Trainer's name for an ``eval_dataset`` dict); then ``best_metric`` is updated
                as the Trainer does when ``metric_for_best_model`` is set
epoch_end       on_epoch_end
checkpoint      on_save
train_end       on_epoch_end if the last epoch stopped part-way (the Trainer ends every epoch
                it began), on_log with ``train_runtime`` and ``train_steps_per_second``, the
                best checkpoint's weights back (``load_best_model_at_end``), on_train_end
exception       none: the Trainer calls no hook when training raises, nor on_train_end (so
                the train_end of an error or a Ctrl-C calls none either)
predict_end     on_prediction_step once per batch, on_predict with ``{"test_batches": n}``
                (``fx.predict``)
==============  ===============================================================================

Where fxtrain has no event at the Trainer's place, the hook runs at the nearest place that keeps
the Trainer's order:

- on_pre_optimizer_step and on_optimizer_step run at step_end, before on_step_end: the update
  happens inside the compiled step. ``state.global_step`` is the count before the update in
  them, as in the Trainer.
- on_prediction_step runs at eval_end (and predict_end), once per batch, before on_log: the
  callback does not take ``fit``'s per-batch eval_batch event, which would cost a host fold
  after every evaluation batch. The count of evaluation batches comes from
  ``len(eval_data)`` (summed over the sets of an ``eval_data`` dict); data without a length
  gets none.
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
``stop``, ``save``, ``evaluate`` and ``log``; ``should_epoch_stop`` becomes ``stop_epoch``
(``fit`` ends the epoch and the data goes on at the next epoch's start: ``fx.data.Batches``, an
iterable or a ``StatefulDataLoader``), and Forgather's ``should_abort_without_save`` becomes
``abort`` (training ends without the final checkpoint).
``load_best_model_at_end`` restores the weights (params and buffers) of the best checkpoint of
the ``CheckpointManager`` given as ``checkpoint`` at train_end, before on_train_end, and the
returned state holds them; without a manager that keeps that checkpoint it is refused.
"""

from __future__ import annotations

import copy
from typing import Any

from .combinators import periodic
from .core import EVENT_KINDS, Callback, set_callback_state
from .hf_hooks import Session, best_key, dispatch, trainer_key
from .hf_views import training_arguments, transformers_module, views

# the events the Trainer has hooks for (eval_end calls on_prediction_step once per batch itself)
_KINDS = tuple(k for k in EVENT_KINDS if k not in ("setup", "restore", "eval_begin",
                                                   "eval_batch"))


def _check_best(args: Any, checkpoint: Any) -> None:
    """``load_best_model_at_end`` needs a manager that keeps the best checkpoint by the same
    metric: the checkpoints are fit's, ranked by the evaluation metrics saved with them."""
    if not args.load_best_model_at_end:
        return
    name = best_key(args)[len("eval_"):]
    mode = "max" if args.greater_is_better else "min"
    if checkpoint is None:
        raise ValueError(
            "hf_callback: args has load_best_model_at_end=True, which puts the best checkpoint "
            "back at the end; pass the CheckpointManager that fit saves with: "
            "hf_callback(cb, args=..., checkpoint=manager) and fit(..., checkpoint=manager), "
            f"with CheckpointManager(directory, keep_best=1, best_metric={name!r}, "
            f"best_mode={mode!r})")
    kept = (checkpoint.keep_best, checkpoint.best_metric, checkpoint.best_mode)
    ranked = (trainer_key(kept[1])[len("eval_"):] if kept[1] else None, kept[2])
    if kept[0] < 1 or ranked != (name, mode):  # a set's "val/loss" is the Trainer's "val_loss"
        raise ValueError(
            f"hf_callback: load_best_model_at_end ranks checkpoints by {name!r} ({mode}), but "
            f"the CheckpointManager keeps keep_best={kept[0]} by best_metric={kept[1]!r} "
            f"({kept[2]}), so the best checkpoint may be deleted; make it with "
            f"CheckpointManager(directory, keep_best=1, best_metric={name!r}, "
            f"best_mode={mode!r})")


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
      A host ``Callback`` whose state is a dict of Python values; it takes the event kinds the
      Trainer has hooks for, step_begin included (not setup, restore, eval_begin or eval_batch).

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
        fxtrain: stopped at step 3 by hf_EarlyStoppingCallback asked to stop
        >>> int(state.step)
        3
        >>> saved = fx.callbacks.callback_state(state, "hf_EarlyStoppingCallback")  # checkpointed
        >>> saved["callback"]["attributes"], saved["trainer_state"]["best_global_step"]
        ({'early_stopping_patience_counter': 2}, 1)

        A callback that saves the model the Trainer's way, with ``model.save_pretrained``:

        >>> import tempfile
        >>> class SaveAtEnd(transformers.TrainerCallback):
        ...     def on_train_end(self, args, state, control, model=None, **kw):
        ...         model.save_pretrained(args.output_dir)
        >>> config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
        >>> gpt = transformers.GPT2LMHeadModel(config)
        >>> gpt.loss_type = "ForCausalLM"
        >>> def lm_loss(state, params, ids):
        ...     return state.apply(params, ids, labels=ids, use_cache=False)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> saver = fx.callbacks.hf_callback(SaveAtEnd(), args={"output_dir": tmp.name})
        >>> state = fx.fit(fx.TrainState.create(gpt, fx.optim.adamw(1e-2)),
        ...                fx.make_train_step(lm_loss),
        ...                fx.data.Batches(torch.randint(0, 32, (8, 16)), 4), max_steps=2,
        ...                callbacks=[saver])
        >>> loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp.name)
        >>> torch.equal(loaded.transformer.wte.weight, state.params["transformer.wte.weight"])
        True
        >>> tmp.cleanup()
    """
    tf = transformers_module()
    if not isinstance(cb, tf.TrainerCallback):
        raise TypeError("hf_callback: cb must be a transformers.TrainerCallback instance, got "
                        f"{type(cb).__name__}")
    due = periodic(log_every, "hf_callback", "log_every")
    training_args, own_args = training_arguments(args, log_every)
    _check_best(training_args, checkpoint)
    session = Session(cb, training_args, tf.TrainerState(logging_steps=log_every),
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
        state, control = dispatch(session, state, event, due)
        session.objects = {}
        new = session.export()
        if saved is not None and new != saved:
            state = set_callback_state(state, name, new)
        last[0] = (state.callbacks or {}).get(name)
        return state, control

    return Callback(name=name, init=init, fn=fn, kinds=_KINDS, host=True)
