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
``fxtrain.step._k_steps``.

Under torch.distributed (one process per rank, as torchrun starts them) every rank runs the
same loop in lockstep: control flags are read at the same steps on every rank and agreed (a
flag any rank raises holds on all, so every rank stops at the same step), evaluation metrics
are merged across ranks, and checkpoints are written by rank 0 and restored by all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any
import warnings

from ..step import _k_steps
from . import _resuming
from .. import distributed, donation, precision
from ..protocol import (Callback, Control, Event, fold_reporting, init, loop_event, save_veto,
                        stop_reasons, with_log_request)
from ..data._batches import as_stream
from ._evaluation import evaluate
from ..data._feed import Feed, prefetches
from ._flags import PendingFlags
from .._memory import out_of_memory
from ..callbacks.memory_snapshot import default_snapshot, explain
from ..callbacks.progress import with_default_progress
from ..callbacks.early_stopping import check_monitor
from ._run import Progress, RunPlan, check_fit_args, eval_sets
from ..step._call import step_call, undo
from ..metrics._means import Means
from ._interrupts import held_in_steps, raise_held
from ._preemption import Preempted, on_sigterm
from ..step._spec import step_spec


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: raised after train_end, with the last ``state`` attached."""

    def __init__(self, state: Any):
        super().__init__("training interrupted; the state at the interruption is in .state")
        self.state = state


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
        averaged on device. With several evaluation sets, one step serves them all, or a dict
        gives each set its own (its keys are ``eval_data``'s).
      eval_data: the evaluation batches, an iterable that can be read again for each
        evaluation; or several sets, a dict of them by name (``{"val": ..., "test": ...}``),
        each evaluated at every evaluation, in the dict's order, into the one eval_end event:
        its metrics are ``<set>/<metric>`` (``val/loss``; the writers' ``eval/val/loss``), and
        a monitor names them so (``early_stopping("test/loss")``, ``best_metric="val/loss"``).
        A set's name is a non-empty string without ``/``. Plain batches keep their metrics'
        names (``loss``, written ``eval/loss``).
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
    in ``fxtrain.step._k_steps``.

    Returns:
      The state after the last step and train_end. Ctrl-C (held until the step it lands in
      ends: ``fxtrain.loop._interrupts``) saves, delivers train_end and raises
      ``fx.Interrupted`` (a KeyboardInterrupt) holding the state in ``.state``; a second Ctrl-C
      inside that step stops at once, and the state that step was given is given up (an earlier
      step's save under way is finished first). SIGTERM (a scheduler's preemption) stops every
      rank at the next flag read, saves, delivers train_end (reason ``"preempted"``) and raises
      ``fx.Preempted`` (a SystemExit with code 143; see ``fxtrain.loop._preemption``). An error
      delivers the exception event and train_end, then is raised again.

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
    check_fit_args(max_steps=max_steps, max_epochs=max_epochs, eval_step=eval_step,
                   eval_data=eval_data, eval_every=eval_every, sync_every=sync_every)
    donation.check_live(state, "fit")
    plan, run, restored = _started(
        state, train_step, data, callbacks=with_default_progress(tuple(callbacks), progress),
        max_steps=max_steps, max_epochs=max_epochs, eval_step=eval_step, eval_data=eval_data,
        eval_every=eval_every, sync_every=sync_every, checkpoint=checkpoint, resume=resume)
    first = run.step
    # SIGTERM: save and stop at the next flag read; SIGINT: held while a step runs
    with on_sigterm(run.signalled), held_in_steps(run):
        try:
            reason = _begin(plan, run, restored)
            while reason is None:
                reason = (plan.limit(run.step, run.epoch) or _call(plan, run)
                          or _boundary(plan, run))
        except KeyboardInterrupt as e:
            if run.in_step and plan.donates:  # a second Ctrl-C, inside a step (_interrupts):
                warnings.warn(  # no whole state to save, hand back or end callbacks with
                    f"fit: stopped inside the step after step {run.step}, which may have "
                    f"written part of its values into the state it was given: that state is "
                    f"given up, not saved, and train_end is not sent", stacklevel=2)
                if state.step is run.state.step:  # the first step: the caller's state too
                    donation.mark(state)
                donation.mark(run.state)
                _resuming.wait(checkpoint)  # an earlier step's save under way still ends
                raise Interrupted(run.state) from e
            _save(plan, run)
            _emit(plan, run, "train_end", {"reason": "interrupted"})
            _resuming.wait(checkpoint)
            raise Interrupted(run.state) from e
        except Exception as e:
            _fail(plan, run, e)
            _resuming.wait(checkpoint)
            raise
        finally:
            if run.step > first and run.state.step is state.step:  # donated
                donation.mark(state)
        # saved before train_end, which may change the state (early_stopping's restore_best):
        # the checkpoint is where training stood, so resuming from it continues the same run
        if reason != "aborted":  # Control.abort: ends without the final checkpoint
            _save(plan, run)
        preempted = run.pending.preempted
        _emit(plan, run, "train_end", _end(plan, run, reason, preempted))
        _resuming.wait(checkpoint)
        if preempted:  # no rank leaves (and has its launcher end the others) before all saved
            distributed.barrier()
    if preempted:
        raise Preempted(run.state)
    return run.state


def _started(state: Any, train_step: Callable, data: Any, *, callbacks: tuple, max_steps,
             max_epochs, eval_step, eval_data, eval_every, sync_every, checkpoint,
             resume: bool) -> tuple[RunPlan, Progress, str | None]:
    """The run's plan and its progress at the start: the callbacks' states made, the data's
    position set, the latest checkpoint restored (and where from, or None)."""
    stream = as_stream(data, state.layout)  # its share of the batch: the layout's
    if max_steps is None and max_epochs is None and stream.repeats:
        raise ValueError("fit: this data repeats for ever; pass max_steps or max_epochs")
    spec = step_spec(train_step)
    if spec.precision.startswith("fp8"):  # the model converted, on a device that runs float8
        precision.policy(spec.precision).check_module(state.module, state.step.device)
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
    _check_best_metric(checkpoint, eval_data)
    host_names = frozenset(cb.name for cb in callbacks if isinstance(cb, Callback) and cb.init)
    k, first = spec.steps_per_call, int(state.step)
    _k_steps.check_calls(k, first, max_steps, eval_every, stream, callbacks)
    plan = RunPlan(run_step=step_call(train_step, spec, host_names, donates), stream=stream,
                   callbacks=callbacks, spec=spec, donates=donates, max_steps=max_steps,
                   max_epochs=max_epochs, eval_every=eval_every, sync_every=sync_every,
                   checkpoint=checkpoint, eval_step=eval_step, eval_data=eval_data)
    device = state.step.device  # where batches go
    feed = Feed(lambda position: _k_steps.take(stream, position, k), device, prefetches(device))
    progress = Progress(state=state, step=first, epoch=int(state.data.epoch), feed=feed,
                        pending=PendingFlags(agree=distributed.world_size() > 1))
    return plan, progress, restored


def _check_best_metric(checkpoint: Any, eval_data: Any) -> None:
    """With several evaluation sets, a ``CheckpointManager``'s ``best_metric`` names one
    (``val/loss``): the metrics saved with a checkpoint are the evaluation's."""
    if eval_sets(eval_data) is None:
        return
    from ..checkpoint.manager import CheckpointManager  # only here: its import is not free

    if isinstance(checkpoint, CheckpointManager) and checkpoint.best_metric:
        check_monitor("fit", checkpoint.best_metric, {"eval_sets": eval_sets(eval_data)},
                      "the checkpoint manager's best_metric")


def _emit(plan: RunPlan, progress: Progress, kind: str, metrics: dict | None = None, *,
          error=None, callbacks: tuple | None = None) -> Control:
    """Folds ``callbacks`` (the host callbacks by default) over an event of ``kind``; the
    control they return waits in ``progress.pending``."""
    event = (Event(kind, progress.step, progress.epoch, metrics, error) if error is not None
             else loop_event(kind, progress.step, progress.epoch, metrics))
    progress.state, control, alike = fold_reporting(
        plan.callbacks if callbacks is None else callbacks, progress.state, event,
        progress.stoppers)
    progress.pending.add(control, alike)
    return control


def _begin(plan: RunPlan, progress: Progress, restored: str | None) -> str | None:
    """setup, restore (``restored``: the checkpoint ``fit`` resumed from), train_begin, and
    what their callbacks ask for: an evaluation, a save (of the state training starts from), a
    log at the first step, a stop, an abort."""
    announced = plan.announced()
    _emit(plan, progress, "setup", announced)
    if restored is not None:
        _emit(plan, progress, "restore", {"step": progress.step, "path": restored})
    _emit(plan, progress, "train_begin", announced)
    control = progress.pending.read()
    if control.abort:
        return "aborted"
    if control.evaluate:
        _evaluate(plan, progress)
    if control.save:
        _save(plan, progress)
    progress.log_next = bool(control.log)
    return "stopped" if control.stop or progress.pending.read().stop else None


def _call(plan: RunPlan, progress: Progress) -> str | None:
    """The next K batches through the step, then step_end (and the undo of a step a host
    callback skipped); "data_exhausted" when the data ran out."""
    if progress.epoch_metrics is None:
        progress.epoch_metrics, progress.epoch_eval = Means(), None
        _emit(plan, progress, "epoch_begin")
    try:
        batch, position, progress.epoch_done = progress.feed.take(progress.state.data)
    except StopIteration:
        return "data_exhausted"
    if plan.before_step:
        _emit(plan, progress, "step_begin", callbacks=plan.before_step)
    before = progress.state
    progress.in_step = True  # a first Ctrl-C from here is held until the state is whole again
    progress.state, metrics = plan.run_step(progress.state, batch, position)
    progress.in_step = False
    raise_held(progress)
    progress.step += plan.k
    if not plan.limit(progress.step, progress.epoch + progress.epoch_done):
        progress.feed.prefetch(position)  # the next call's batches, while this one runs
    progress.pending.add_step(metrics)
    progress.epoch_metrics.add(metrics)
    if progress.log_next:
        metrics, progress.log_next = with_log_request(metrics), False
    if plan.at_step_end:  # no fold (and no Event) for a run without such callbacks
        control = _emit(plan, progress, "step_end", metrics, callbacks=plan.at_step_end)
        progress.state = undo(before, progress.state, control.skip, plan.donates,
                              progress.step)
    return None


def _boundary(plan: RunPlan, progress: Progress) -> str | None:
    """At an eval, epoch, sync or limit boundary (or on an urgent request): one read of the
    pending flags, then evaluation, epoch_end, a save and the stop they ask for."""
    step, epoch_done = progress.step, progress.epoch_done
    eval_due = plan.eval_step is not None and (
        step % plan.eval_every == 0 if plan.eval_every else epoch_done)
    if not (eval_due or epoch_done or step % plan.sync_every < plan.k
            or progress.pending.urgent() or plan.limit(step, progress.epoch + epoch_done)):
        return None
    control = progress.pending.read()
    if control.abort:
        return "aborted"
    if control.stop_epoch and not epoch_done:  # the data goes on at the next epoch
        progress.state = progress.state.replace(data=_skipped_epoch(plan, progress))
        epoch_done = True
        eval_due = eval_due or (plan.eval_step is not None and not plan.eval_every)
    if eval_due or control.evaluate:
        _evaluate(plan, progress)
    if epoch_done:
        _emit(plan, progress, "epoch_end", {**progress.epoch_metrics.take(), **{
            f"eval/{k}": v for k, v in (progress.epoch_eval or {}).items()}})
        progress.epoch, progress.epoch_metrics = progress.epoch + 1, None
    control = control | progress.pending.read()
    _warn_nonfinite(plan, progress)
    if control.save:
        _save(plan, progress)
    progress.log_next = bool(control.log)
    return "stopped" if control.stop or progress.pending.read().stop else None


def _fail(plan: RunPlan, progress: Progress, error: Exception) -> None:
    """An error ends the run: the exception event (a save it asks for is made when the state
    is whole and one process runs), then train_end; the caller re-raises ``error``, with a note
    when a callback failed on the way, and for an out-of-memory error notes of what the step
    held, a snapshot (CUDA) and the levers (``fxtrain.callbacks.memory_snapshot``)."""
    try:
        control = _emit(plan, progress, "exception", error=error)
        if out_of_memory(error):  # what the step held, a snapshot, the levers
            explain(error, progress.state, progress.step,
                    snapshot=default_snapshot(progress.step))
        progress.pending = PendingFlags()  # no collective reads now: another rank may be gone
        if bool(control.save):
            why = ("it was raised inside a step that may have donated the state"
                   if progress.in_step and plan.donates else
                   "other ranks cannot join the save" if distributed.world_size() > 1
                   else None)
            if why is None:
                _save(plan, progress)
            else:
                warnings.warn(f"fit: not saving after the error at step {progress.step}: {why}",
                              stacklevel=3)
        _emit(plan, progress, "train_end", {"reason": "error"})
    except Exception as e:  # the run's own error matters more
        error.add_note(f"fxtrain: a callback raised {e!r} while handling this error")


def _end(plan: RunPlan, progress: Progress, reason: str, preempted: bool) -> dict[str, Any]:
    """train_end's metrics: why the run ended, and who stopped it (said on rank 0 too)."""
    end = {"reason": "preempted" if preempted else reason}
    if reason == "stopped" and not preempted:
        end["stopped_by"] = _stopped_by(plan, progress)
        if distributed.is_rank_zero():
            print(f"fxtrain: stopped at step {progress.step} by {end['stopped_by']}", flush=True)
    return end


def _warn_nonfinite(plan: RunPlan, progress: Progress) -> None:
    """Once per run: a read found a loss that was not finite (read with the flags, at a
    boundary that reads them anyway)."""
    if progress.pending.nonfinite_loss and not progress.warned_nonfinite:
        progress.warned_nonfinite = True
        guarded = any(isinstance(cb, Callback) and cb.save_veto is not None
                      for cb in plan.all_callbacks)  # nan_guard: it skips them
        if distributed.is_rank_zero() and not guarded:
            warnings.warn(
                f"fit: the loss was NaN or infinite at a step before step {progress.step}; "
                "checkpoints of non-finite parameters are not saved (the last finite one stays "
                "the latest). fx.callbacks.nan_guard('skip') discards such steps, "
                "nan_guard('stop') ends the run at the first", RuntimeWarning, stacklevel=4)


def _stopped_by(plan: RunPlan, progress: Progress) -> str:
    """Which callbacks stopped the run, and why (their states' ``stop_reason``; the host
    callbacks that asked outright)."""
    said = [f"{name}: {why}" for name, why in stop_reasons(plan.all_callbacks, progress.state)]
    said += [f"{name} asked to stop" for name in dict.fromkeys(progress.stoppers)
             if not any(s.startswith(f"{name}: ") for s in said)]
    return "; ".join(said) or "a callback asked to stop"


def _skipped_epoch(plan: RunPlan, progress: Progress) -> Any:
    """The data position at the next epoch's start (``Control.stop_epoch``)."""
    skip = getattr(plan.stream, "skip_epoch", None)
    if skip is None:
        raise ValueError(f"fit: a callback asked to end the epoch (Control.stop_epoch), but "
                         f"this data ({type(plan.stream).__name__}) cannot skip to its next "
                         "epoch; use fx.data.Batches, an iterable or a StatefulDataLoader")
    return skip(progress.state.data)


def _evaluate(plan: RunPlan, progress: Progress) -> None:
    if plan.eval_step is None:
        warnings.warn(f"fit: a callback asked for an evaluation at step {progress.step}, but "
                      "fit has no eval_step and eval_data to run", stacklevel=3)
        return
    _emit(plan, progress, "eval_begin")
    def named(name: str | None, metrics: dict) -> dict:  # a set's: <set>/<metric>
        return metrics if name is None else {f"{name}/{k}": v for k, v in metrics.items()}

    def batch_of(name: str | None):
        if not plan.per_eval_batch:
            return None
        return lambda metrics: _emit(plan, progress, "eval_batch", named(name, metrics),
                                     callbacks=plan.per_eval_batch)

    metrics = {}
    for name, eval_step, data in plan.evaluations:  # the sets in eval_data's order
        got = evaluate(eval_step, progress.state, data, on_batch=batch_of(name))
        metrics.update(named(name, got))
    progress.last_eval = progress.step, metrics
    progress.epoch_eval = metrics
    _emit(plan, progress, "eval_end", metrics)


def _save(plan: RunPlan, progress: Progress) -> None:
    """A checkpoint of the state now, with the metrics of an evaluation at this step; never a
    state a callback vetoes (``nan_guard`` after a non-finite step)."""
    if plan.checkpoint is None:
        return
    veto = save_veto(plan.all_callbacks, progress.state)
    if veto:
        warnings.warn(f"fit: not saving step {progress.step}: {veto}", stacklevel=3)
        return
    step, (eval_step, eval_metrics) = progress.step, progress.last_eval
    if plan.checkpoint.save(progress.state, eval_metrics if eval_step == step else None,
                            force=True):
        _emit(plan, progress, "checkpoint",
              {"step": step, "path": str(plan.checkpoint.directory / str(step))})
