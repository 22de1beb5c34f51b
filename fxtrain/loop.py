"""``fit``: the training loop. Take a batch, step, fold the callbacks, honour the control.

The loop runs on the host. The compiled step returns device tensors; the loop never reads them
per step. Control flags computed with tensors inside the step are read together, in one sync,
every ``sync_every`` steps and at every eval, epoch and checkpoint boundary. So a stop raised
inside the step takes effect up to ``sync_every - 1`` steps late; in-step callbacks that stop
(``early_stopping``) also skip the updates of those extra steps, so the parameters stay where
they stopped. A host callback runs when it is due, and a flag it returns as a tensor is read
at the end of that step (one read, with any in-step flags pending), as a Python bool is acted
on: pass tensor-maths callbacks to ``make_train_step(callbacks=...)`` rather than to ``fit``
where they run every step, or they cost a read per step. With several ranks, one rank's host
callback cannot start the collective read alone: its tensor flags wait for the next boundary.

K steps per call (``make_train_step(..., steps_per_call=K)``): the rules are in
``fxtrain._k_steps``.

Under torch.distributed (one process per rank, as torchrun starts them) every rank runs the
same loop in lockstep: control flags are read at the same steps on every rank and agreed (a
flag any rank raises holds on all, so every rank stops at the same step), evaluation metrics
are merged across ranks, and checkpoints are written by rank 0 and restored by all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any
import warnings

from . import _k_steps, _resuming, distributed, donation
from .protocol import (Callback, Control, Event, fold_reporting, init, loop_event, save_veto,
                       stop_reasons, takes_step_end, with_log_request)
from .data import as_stream, length_of
from .evaluation import evaluate
from .feed import Feed, prefetches
from ._flags import PendingFlags
from .callbacks.progress import with_default_progress
from ._step_call import step_call, undo
from .means import Means
from .preemption import Preempted, on_sigterm
from ._step_spec import StepSpec, step_spec


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: raised after train_end, with the last ``state`` attached."""

    def __init__(self, state: Any):
        super().__init__("training interrupted; the state at the interruption is in .state")
        self.state = state


def _check(max_steps, max_epochs, eval_step, eval_data, eval_every, sync_every) -> None:
    for label, value in (("max_steps", max_steps), ("max_epochs", max_epochs),
                         ("eval_every", eval_every), ("sync_every", sync_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fit: {label} must be a positive int or None, got {value!r}")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: eval_step and eval_data go together; pass both or neither")
    if eval_every is not None and eval_step is None:
        raise ValueError("fit: eval_every needs eval_step and eval_data")


def _plan(stream, max_steps, max_epochs, eval_data, spec: StepSpec,
          sync_every) -> dict[str, Any]:
    """What train_begin tells the callbacks about the run."""
    return {"max_steps": max_steps, "max_epochs": max_epochs,
            "steps_per_epoch": length_of(stream), "batch_size": stream.batch_size,
            "eval_batches": None if eval_data is None else length_of(eval_data),
            "compiled": spec.compiled, "sync_every": sync_every,
            "steps_per_call": spec.steps_per_call,
            **({} if spec.precision == "32" else {"precision": spec.precision}),
            **({"cuda_graphs": True} if spec.cuda_graphs else {})}


def fit(state: Any, train_step: Callable, data: Any, *, callbacks: Sequence[Callable] = (),
        max_steps: int | None = None, max_epochs: int | None = None,
        eval_step: Callable | None = None, eval_data: Iterable | None = None,
        eval_every: int | None = None, checkpoint: Any = None, sync_every: int = 50,
        resume: bool = True, progress: bool | None = None) -> Any:
    """Trains ``state`` with ``train_step`` on ``data`` and returns the final state.

    Args:
      state: a ``TrainState``; its ``data`` field holds the stream's position (set on the first
        call) and ``callbacks`` the host callbacks' states (initialised when missing).
      train_step: ``(state, batch) -> (state, metrics)``, usually compiled.
      data: ``fx.data.Batches`` (exact resume), a torchdata ``StatefulDataLoader`` (its
        ``state_dict()`` is kept in the state) or any iterable of batches. Each batch goes to
        the state's device (``fx.to_device``); on CUDA the next call's batches are taken,
        page-locked and copied on a side stream while the step runs (one call ahead; a
        one-shot iterator may so lose one batch to a stop that callbacks ask for).
      callbacks: host callbacks, folded after every event.
      max_steps: stop when ``state.step`` reaches this (counted over resumes).
      max_epochs: stop when this many epochs of ``data`` are done.
      eval_step: ``(state, batch) -> metrics``, run over ``eval_data`` every ``eval_every``
        steps (default: at each epoch end) and on ``control.evaluate``; batch metrics are
        averaged on device.
      eval_data: the evaluation batches, an iterable that can be read again for each evaluation.
      eval_every: steps between evaluations.
      checkpoint: an ``fx.checkpoint.CheckpointManager`` (or an object with its ``save``,
        ``wait``, ``latest_step`` and ``restore``): training resumes from its latest checkpoint,
        and it saves on ``control.save`` (see ``fx.callbacks.checkpoint_policy``), at the end and on
        Ctrl-C, with the metrics of an evaluation at the same step; never a state that
        ``nan_guard`` flagged.
      sync_every: steps between reads of tensor control flags (one sync each).
      resume: with ``checkpoint``, start from its latest checkpoint when there is one (and say
        so); False refuses a directory with later checkpoints than ``state`` (two runs would mix).
      progress: show a progress bar (``fx.callbacks.progress_bar()``) unless a callback shows
        progress already. None (the default): when someone watches, in a terminal or a
        notebook, not when standard error goes to a file or is captured; True always; False
        never.

    A step made with ``make_train_step(..., steps_per_call=K)`` gets K stacked batches per call
    and host callbacks one step_end per call; the rules (intervals that are multiples of K) are
    in ``fxtrain._k_steps``.

    Returns:
      The state after the last step and train_end. Ctrl-C saves, delivers train_end and raises
      ``fx.Interrupted`` (a KeyboardInterrupt) holding the state in ``.state``. SIGTERM (a
      scheduler's preemption) stops every rank at the next flag read, saves, delivers train_end
      (reason ``"preempted"``) and raises ``fx.Preempted`` (a SystemExit with code 143; see
      ``fxtrain.preemption``). An error delivers the exception event and train_end, then is
      raised again.

    Examples:
        >>> x = torch.randn(64, 3)
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> state = fx.TrainState.create(nn.Linear(3, 1), fx.optim.sgd(0.2), seed=0)
        >>> train_step = fx.make_train_step(loss_fn)  # torch.compile it (fullgraph=True) for speed
        >>> def report(state, event):  # a host callback: a plain function of (state, event)
        ...     if event.kind == "epoch_end":
        ...         print("epoch", event.epoch, "step", int(state.step))
        >>> state = fx.fit(state, train_step, fx.data.Batches((x, y), 16, seed=0), max_epochs=5,
        ...                callbacks=[report])
        epoch 0 step 4
        epoch 1 step 8
        epoch 2 step 12
        epoch 3 step 16
        epoch 4 step 20
        >>> float(loss_fn(state, state.params, (x, y))) < 0.01
        True
    """
    _check(max_steps, max_epochs, eval_step, eval_data, eval_every, sync_every)
    donation.check_live(state, "fit")
    callbacks = with_default_progress(tuple(callbacks), progress)
    stream = as_stream(data)
    if max_steps is None and max_epochs is None and stream.repeats:
        raise ValueError("fit: this data repeats for ever; pass max_steps or max_epochs")
    given, spec = state, step_spec(train_step)
    state = init((*spec.step_states, *spec.in_step_callbacks, *callbacks), state)
    if state.data is None:
        state = state.replace(data=stream.init())
    restored = None
    if checkpoint is not None:
        before = state
        state = _resuming.resume(checkpoint, state, resume)
        if state is not before:  # resumed: the checkpoint it came from
            restored = f"{getattr(checkpoint, 'directory', 'checkpoint')}/{int(state.step)}"
    settle = getattr(stream, "settle", None)  # an epoch resumed with no batch left: the next
    if settle is not None:
        state = state.replace(data=settle(state.data))
    donates = not _k_steps.skipping(callbacks)
    if not donates and spec.cuda_graphs:
        raise ValueError(f"fit: host callback {_k_steps.skipping(callbacks)[0].name} may skip a "
                         "step, but this step always donates its state (cuda_graphed), so the "
                         "step cannot be undone; pass the callback to make_train_step(..., "
                         "callbacks=[...]), where it skips inside the step")
    host_names = frozenset(cb.name for cb in callbacks if isinstance(cb, Callback) and cb.init)
    k, first = spec.steps_per_call, int(state.step)
    _k_steps.check_calls(k, first, max_steps, eval_every, stream, callbacks)
    run = _Run(state, first, callbacks, stream, step_call(train_step, spec, host_names, donates),
               donates, spec, _Schedule(max_steps, max_epochs, eval_every, sync_every), checkpoint,
               eval_step, eval_data)
    with on_sigterm(run.signalled):  # SIGTERM: save and stop at the next flag read
        try:
            reason = run.begin(_plan(stream, max_steps, max_epochs, eval_data, spec,
                                     sync_every), restored)
            while reason is None:
                reason = run.schedule.limit(run.step, run.epoch) or run.call() or run.boundary()
        except KeyboardInterrupt as e:
            run.save()
            run.emit("train_end", {"reason": "interrupted"})
            _resuming.wait(checkpoint)
            raise Interrupted(run.state) from e
        except Exception as e:
            run.fail(e)
            _resuming.wait(checkpoint)
            raise
        finally:
            if run.step > first and run.state.step is given.step:  # donated: given's reused
                donation.mark(given)
        # saved before train_end, which may change the state (early_stopping's restore_best):
        # the checkpoint is where training stood, so resuming from it continues the same run
        if reason != "aborted":  # Control.abort: ends without the final checkpoint
            run.save()
        preempted = run.pending.preempted
        end = {"reason": "preempted" if preempted else reason}
        if reason == "stopped" and not preempted:
            end["stopped_by"] = run.stopped_by()
            if distributed.is_rank_zero():
                print(f"fxtrain: stopped at step {run.step} by {end['stopped_by']}", flush=True)
        run.emit("train_end", end)
        _resuming.wait(checkpoint)
        if preempted:  # no rank leaves (and has its launcher end the others) before all saved
            distributed.barrier()
    if preempted:
        raise Preempted(run.state)
    return run.state


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """When a run stops, evaluates and reads its flags."""

    max_steps: int | None
    max_epochs: int | None
    eval_every: int | None
    sync_every: int

    def limit(self, step: int, epoch: int) -> str | None:
        """Why the run ends at ``step`` and ``epoch``, or None."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return "max_epochs"
        return None


class _Run:
    """One ``fit`` call in motion: the state, the step and epoch counters, the control flags
    waiting to be read, and the parts of the loop that move them: ``call`` (the next K batches
    through the step, then step_end) and ``boundary`` (read the flags, then evaluate, end the
    epoch, save, stop), with ``emit``, ``evaluate`` and ``save`` beneath them."""

    def __init__(self, state, step, callbacks, stream, run_step, donates, spec, schedule,
                 checkpoint, eval_step, eval_data):
        self.state, self.callbacks, self.run_step = state, callbacks, run_step
        self.all_callbacks = (*spec.in_step_callbacks, *callbacks)  # vetoes, stop reasons
        k = spec.steps_per_call
        self.donates, self.k, self.schedule, self.checkpoint = donates, k, schedule, checkpoint
        self.eval_step, self.eval_data, self.stream = eval_step, eval_data, stream
        self.step, self.epoch = step, int(state.data.epoch)
        device = state.step.device  # where batches go
        self.feed = Feed(lambda position: _k_steps.take(stream, position, k), device,
                         prefetches(device))
        self.pending = PendingFlags(agree=distributed.world_size() > 1)
        self.last_eval: tuple = (None, None)  # (step, metrics) of the latest evaluation
        self.log_next, self.epoch_done = False, False
        self.epoch_metrics: Means | None = None  # None: the epoch has not begun
        self.epoch_eval: dict | None = None  # the epoch's latest evaluation
        self.before_step = tuple(cb for cb in callbacks  # those that asked for step_begin
                                 if isinstance(cb, Callback) and "step_begin" in cb.kinds)
        self.per_eval_batch = tuple(cb for cb in callbacks  # and for eval_batch
                                    if isinstance(cb, Callback) and "eval_batch" in cb.kinds)
        self.at_step_end = tuple(cb for cb in callbacks if takes_step_end(cb))  # per step
        self.in_step = False  # inside the step call (its state may be donated half-way)
        self.stoppers: list[str] = []  # host callbacks that asked to stop outright
        self.warned_nonfinite = False

    def emit(self, kind: str, metrics: dict | None = None, *, error=None,
             callbacks: tuple | None = None) -> Control:
        event = (Event(kind, self.step, self.epoch, metrics, error) if error is not None
                 else loop_event(kind, self.step, self.epoch, metrics))
        self.state, control, alike = fold_reporting(
            self.callbacks if callbacks is None else callbacks, self.state, event, self.stoppers)
        self.pending.add(control, alike)
        return control

    def signalled(self) -> None:
        """SIGTERM arrived (called by the signal handler: it only raises a flag)."""
        self.pending.signalled = True

    def begin(self, plan: dict, restored: str | None) -> str | None:
        """setup, restore (``restored``: the checkpoint ``fit`` resumed from), train_begin, and
        what their callbacks ask for: an evaluation, a save (of the state training starts
        from), a log at the first step, a stop, an abort."""
        self.emit("setup", plan)
        if restored is not None:
            self.emit("restore", {"step": self.step, "path": restored})
        self.emit("train_begin", plan)
        control = self.pending.read()
        if control.abort:
            return "aborted"
        if control.evaluate:
            self.evaluate()
        if control.save:
            self.save()
        self.log_next = bool(control.log)
        return "stopped" if control.stop or self.pending.read().stop else None

    def fail(self, error: Exception) -> None:
        """An error ends the run: the exception event (a save it asks for is made when the
        state is whole and one process runs), then train_end; the caller re-raises ``error``,
        with a note when a callback failed on the way."""
        try:
            control = self.emit("exception", error=error)
            self.pending = PendingFlags()  # no collective reads now: another rank may be gone
            if bool(control.save):
                why = ("it was raised inside a step that may have donated the state"
                       if self.in_step and self.donates else
                       "other ranks cannot join the save" if distributed.world_size() > 1
                       else None)
                if why is None:
                    self.save()
                else:
                    warnings.warn(f"fit: not saving after the error at step {self.step}: {why}",
                                  stacklevel=3)
            self.emit("train_end", {"reason": "error"})
        except Exception as e:  # the run's own error matters more
            error.add_note(f"fxtrain: a callback raised {e!r} while handling this error")

    def call(self) -> str | None:
        """The next K batches through the step, then step_end (and the undo of a step a host
        callback skipped); "data_exhausted" when the data ran out."""
        if self.epoch_metrics is None:
            self.epoch_metrics, self.epoch_eval = Means(), None
            self.emit("epoch_begin")
        try:
            batch, position, self.epoch_done = self.feed.take(self.state.data)
        except StopIteration:
            return "data_exhausted"
        if self.before_step:
            self.emit("step_begin", callbacks=self.before_step)
        before = self.state
        self.in_step = True
        self.state, metrics = self.run_step(self.state, batch, position)
        self.in_step = False
        self.step += self.k
        if not self.schedule.limit(self.step, self.epoch + self.epoch_done):
            self.feed.prefetch(position)  # the next call's batches, while this one runs
        self.pending.add_step(metrics)
        self.epoch_metrics.add(metrics)
        if self.log_next:
            metrics, self.log_next = with_log_request(metrics), False
        if self.at_step_end:  # no fold (and no Event) for a run without such callbacks
            control = self.emit("step_end", metrics, callbacks=self.at_step_end)
            self.state = undo(before, self.state, control.skip, self.donates, self.step)
        return None

    def boundary(self) -> str | None:
        """At an eval, epoch, sync or limit boundary (or on an urgent request): one read of the
        pending flags, then evaluation, epoch_end, a save and the stop they ask for."""
        schedule, epoch_done = self.schedule, self.epoch_done
        eval_due = self.eval_step is not None and (
            self.step % schedule.eval_every == 0 if schedule.eval_every else epoch_done)
        if not (eval_due or epoch_done or self.step % schedule.sync_every < self.k
                or self.pending.urgent() or schedule.limit(self.step, self.epoch + epoch_done)):
            return None
        control = self.pending.read()
        if control.abort:
            return "aborted"
        if control.stop_epoch and not epoch_done:  # the data goes on at the next epoch
            self.state = self.state.replace(data=self.skipped_epoch())
            epoch_done = True
            eval_due = eval_due or (self.eval_step is not None and not schedule.eval_every)
        if eval_due or control.evaluate:
            self.evaluate()
        if epoch_done:
            self.emit("epoch_end", {**self.epoch_metrics.take(), **{
                f"eval/{k}": v for k, v in (self.epoch_eval or {}).items()}})
            self.epoch, self.epoch_metrics = self.epoch + 1, None
        control = control | self.pending.read()
        self.warn_nonfinite()
        if control.save:
            self.save()
        self.log_next = bool(control.log)
        return "stopped" if control.stop or self.pending.read().stop else None

    def warn_nonfinite(self) -> None:
        """Once per run: a read found a loss that was not finite (read with the flags, at a
        boundary that reads them anyway)."""
        if self.pending.nonfinite_loss and not self.warned_nonfinite:
            self.warned_nonfinite = True
            guarded = any(isinstance(cb, Callback) and cb.save_veto is not None
                          for cb in self.all_callbacks)  # nan_guard: it skips them
            if distributed.is_rank_zero() and not guarded:
                warnings.warn(
                    f"fit: the loss was NaN or infinite at a step before step {self.step}; "
                    "checkpoints of non-finite parameters are not saved (the last finite one "
                    "stays the latest). fx.callbacks.nan_guard('skip') discards such steps, "
                    "nan_guard('stop') ends the run at the first", RuntimeWarning, stacklevel=4)

    def stopped_by(self) -> str:
        """Which callbacks stopped the run, and why (their states' ``stop_reason``; the host
        callbacks that asked outright)."""
        said = [f"{name}: {why}" for name, why in stop_reasons(self.all_callbacks, self.state)]
        said += [f"{name} asked to stop" for name in dict.fromkeys(self.stoppers)
                 if not any(s.startswith(f"{name}: ") for s in said)]
        return "; ".join(said) or "a callback asked to stop"

    def skipped_epoch(self) -> Any:
        """The data position at the next epoch's start (``Control.stop_epoch``)."""
        skip = getattr(self.stream, "skip_epoch", None)
        if skip is None:
            raise ValueError(f"fit: a callback asked to end the epoch (Control.stop_epoch), but "
                             f"this data ({type(self.stream).__name__}) cannot skip to its next "
                             "epoch; use fx.data.Batches, an iterable or a StatefulDataLoader")
        return skip(self.state.data)

    def evaluate(self) -> None:
        if self.eval_step is None:
            warnings.warn(f"fit: a callback asked for an evaluation at step {self.step}, but "
                          "fit has no eval_step and eval_data to run", stacklevel=3)
            return
        self.emit("eval_begin")
        on_batch = None
        if self.per_eval_batch:
            def on_batch(metrics: dict) -> None:
                self.emit("eval_batch", metrics, callbacks=self.per_eval_batch)
        self.last_eval = (self.step, evaluate(self.eval_step, self.state, self.eval_data,
                                              on_batch=on_batch))
        self.epoch_eval = self.last_eval[1]
        self.emit("eval_end", self.last_eval[1])

    def save(self) -> None:
        """A checkpoint of the state now, with the metrics of an evaluation at this step; never
        a state a callback vetoes (``nan_guard`` after a non-finite step)."""
        if self.checkpoint is None:
            return
        veto = save_veto(self.all_callbacks, self.state)
        if veto:
            warnings.warn(f"fit: not saving step {self.step}: {veto}", stacklevel=3)
            return
        metrics = self.last_eval[1] if self.last_eval[0] == self.step else None
        if self.checkpoint.save(self.state, metrics, force=True):
            self.emit("checkpoint", {"step": self.step,
                                     "path": str(self.checkpoint.directory / str(self.step))})
