"""``CheckpointManager``: numbered checkpoints of the whole state, on orbax's CheckpointManager.

Each checkpoint is a directory named by the state's step, holding the state's arrays and a JSON
description (``fx.checkpoint.bridge``). orbax writes it under a temporary name and renames it into
place when complete, so a process killed mid-save leaves the previous checkpoints as they were and
nothing that ``latest_step()`` would return; leftovers are removed when a manager opens the
directory. Retention (``fxtrain.checkpoint.retention``, after every save of either kind, orbax's
or sharded) keeps the latest ``keep_latest`` together with the best ``keep_best`` by
``best_metric``, so the newest checkpoint is never deleted; orbax itself deletes nothing. A state
whose parameters are not finite is never saved, so retention never deletes the last finite
checkpoint for the checkpoints of a diverged run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..logging.numbers import is_number, read_floats
from .. import distributed
from . import bridge, layout, remote, retention, shards, store


def _floats(metrics: Mapping | None) -> dict[str, float]:
    """JSON-able metrics: the one-number tensors and numbers among ``metrics``, as floats."""
    numbers = {str(k): v for k, v in (metrics or {}).items() if is_number(v)}
    return read_floats(numbers)


def _check(keep_latest, keep_best, best_metric, best_mode, save_interval_steps) -> None:
    if not isinstance(keep_latest, int) or keep_latest < 1:
        raise ValueError(f"keep_latest must be an int >= 1 (the newest checkpoint is always "
                         f"kept), got {keep_latest!r}")
    if not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
    if keep_best and not best_metric:
        raise ValueError("keep_best needs best_metric: the name of the metric that ranks "
                         "checkpoints")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if save_interval_steps is not None and (not isinstance(save_interval_steps, int)
                                            or save_interval_steps < 1):
        raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")


class CheckpointManager:
    """Saves and restores numbered checkpoints of a ``TrainState`` in ``directory``.

    Args:
      directory: where the checkpoints go, one subdirectory per step (created on the first
        save); or a URL in object storage (``s3://bucket/run``, any fsspec filesystem:
        ``fxtrain.checkpoint.remote``), where each step becomes visible once all of it is
        uploaded, with credentials from the provider's environment and configuration.
      keep_latest: how many of the newest checkpoints to keep (at least 1).
      keep_best: how many of the best checkpoints by ``best_metric`` to keep as well (of
        equal values the older ranks first; one without a finite value does not rank).
      best_metric: the metric (a key of ``save``'s ``metrics``) that ranks checkpoints; from
        ``fit``, an evaluation metric (``"loss"``, or ``"val/loss"`` with several sets).
      best_mode: "min" or "max": which way is better.
      async_save: write on a background thread; ``save`` returns once the arrays are captured.
      save_interval_steps: with it, ``save`` skips steps that are not a multiple of it unless
        ``force=True``.
      metadata: JSON-able values stored with every checkpoint (the run's configuration).

    Examples:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> x, y = torch.randn(32, 2), torch.randn(32, 1)
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> with fx.checkpoint.CheckpointManager(tmp.name, keep_latest=2, keep_best=1,
        ...                                      best_metric="loss") as manager:
        ...     state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((x, y), 8),
        ...                    max_steps=8, eval_step=fx.make_eval_step(loss_fn), eval_every=2,
        ...                    eval_data=fx.data.Batches((x, y), 16, shuffle=False),
        ...                    checkpoint=manager,
        ...                    callbacks=[fx.callbacks.checkpoint_policy(every=2)])
        ...     print(manager.all_steps(), manager.latest_step())
        ...     best = manager.restore(like=state, step=manager.best_step())
        [6, 8] 8
        >>> int(best.step) == manager.best_step()
        True
        >>> tmp.cleanup()
    """

    def __init__(self, directory: str | os.PathLike, *, keep_latest: int = 2, keep_best: int = 0,
                 best_metric: str | None = None, best_mode: str = "min", async_save: bool = True,
                 save_interval_steps: int | None = None, metadata: Mapping | None = None):
        _check(keep_latest, keep_best, best_metric, best_mode, save_interval_steps)
        self._store = remote.Store(directory) if remote.is_url(directory) else None
        self._staging: Path | None = None  # a local folder each save to a store is written in
        if self._store is not None:
            self.directory: Path | remote.Url = self._store.url
        else:
            self.directory = Path(directory).expanduser().absolute()
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(f"checkpoint directory {self.directory} is a file")
        self.keep_latest, self.keep_best = keep_latest, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode
        self.async_save, self.save_interval_steps = async_save, save_interval_steps
        self.metadata = dict(metadata or {})
        self._orbax = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future] | None = None
        self._pending_shards: Callable[[], None] | None = None  # a sharded save in flight
        self._group = None  # the process group sharded saves are written in the background on
        if async_save:  # import orbax (and jax, ~1.3 s) now, while the run is set up, not on
            store.orbax()  # the writer thread during the first save, where it slows training

    # -- orbax -----------------------------------------------------------------------------

    def _manager(self):
        """orbax's manager, made on first use (so ``import fxtrain`` never imports orbax).

        It writes each checkpoint under a temporary name and renames it into place, and keeps
        every checkpoint (retention is ``_retain``'s, for sharded checkpoints too). It saves
        synchronously: ``async_save`` runs it on this manager's own writer thread, so the
        training loop waits only for ``bridge.encode`` and a copy of its arrays (the next step
        may overwrite the state's tensors in place: see ``fx.donation``), not for orbax's
        per-save setup, copies or the deletion of old checkpoints.
        """
        if self._orbax is None:
            ocp = store.orbax()
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=False, create=False, cleanup_tmp_directories=True,
                # one writer: under torch.distributed only rank 0 makes this manager, and each
                # process is its own single-process JAX runtime, so orbax never coordinates
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes={0}))
            self._orbax = ocp.CheckpointManager(self.directory, options=options,
                                                item_handlers=store.handlers())
        return self._orbax

    # -- saving ----------------------------------------------------------------------------

    def _writable(self) -> None:
        if self._store is not None:
            self._store.check_writable()
            if self._staging is None:  # the first save: what saves cut off left goes
                self._store.clear_uncommitted()
                self._staging = Path(tempfile.mkdtemp(prefix="fxtrain-staging-"))
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the checkpoint directory {self.directory}: {e}") from e
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot save: the checkpoint directory {self.directory} is "
                                  "not writable")

    def _write(self, step: int, arrays: dict, meta: dict) -> None:
        """Writes one checkpoint (orbax: a temporary name renamed into place), flushes it, and
        applies retention."""
        if self._store is not None:
            self._upload(step, arrays, meta)
            self._retain(step)
            return
        try:
            self._manager().save(step, args=store.composite(arrays, meta), force=True)
        except Exception as e:
            if not store.is_checkpoint(self.directory / str(step)):
                raise OSError(f"writing the checkpoint of step {step} in {self.directory} "
                              f"failed (the older checkpoints are intact): {e}") from e
            warnings.warn(f"CheckpointManager: step {step} is saved in {self.directory}, but "
                          f"orbax failed after putting it in place ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)
        try:
            store.fsync_tree(self.directory / str(step))
        except Exception as e:
            raise OSError(f"flushing the checkpoint of step {step} in {self.directory} to disk "
                          f"failed: {e}") from e
        self._retain(step)

    def _upload(self, step: int, arrays: dict, meta: dict) -> None:
        """Writes one checkpoint in the staging folder, uploads it and commits it."""
        folder = self._staging / str(step)
        try:
            store.write(folder, arrays, meta)
            self._store.save_folder(folder, step)
        except Exception as e:
            raise OSError(f"writing the checkpoint of step {step} to {self.directory} failed "
                          f"(the older checkpoints are intact; what was uploaded of it is not a "
                          f"checkpoint, and the next save deletes it): {type(e).__name__}: "
                          f"{e}") from e
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def _where(self) -> Path | remote.Store:
        """What retention and ranking read: the folder, or the store."""
        return self._store if self._store is not None else self.directory

    def _retain(self, step: int) -> None:
        """Deletes the checkpoints neither among the latest ``keep_latest`` nor the best
        ``keep_best`` (``retention.prune``), after every save of either kind; warns when one
        cannot be deleted."""
        try:
            errors = retention.prune(self._where, keep_latest=self.keep_latest,
                                     keep_best=self.keep_best, metric=self.best_metric,
                                     mode=self.best_mode)
        except Exception as e:  # the new checkpoint is on disk whatever failed here
            errors = [e]
        if errors:
            self._retention_failed(step, errors[0])

    def _retention_failed(self, step: int, error: Exception) -> None:
        """Retention could not delete an older checkpoint: the new one is saved, so training
        goes on; the old ones stay on disk until a later save deletes them."""
        warnings.warn(f"CheckpointManager: step {step} is saved in {self.directory}, but "
                      f"deleting older checkpoints beyond keep_latest={self.keep_latest}"
                      f"{f' and keep_best={self.keep_best}' if self.keep_best else ''} failed "
                      f"({type(error).__name__}: {error}); they stay on disk, and a later save "
                      "tries again", RuntimeWarning, stacklevel=2)

    def save(self, state: Any, metrics: Mapping | None = None, force: bool = False) -> bool:
        """Saves ``state`` as the checkpoint of its step; returns whether it wrote one.

        Under torch.distributed every rank calls it: rank 0 writes (the state is the same on
        every rank) and all ranks return its answer, or raise its error. A sharded state
        (``fx.shard``) is written by every rank, each its own shards, with
        torch.distributed.checkpoint (see ``fxtrain.checkpoint.shards``).

        With ``async_save`` the write happens on a background thread: ``save`` returns once the
        state's arrays are copied to host memory (a snapshot, released when the write is done),
        so a donating step may overwrite the state in place right after.

        A step already on disk is never overwritten (a resumed run reaching it again, or the end
        of a run right after a periodic save): the call returns False. Neither is a state whose
        parameters or buffers hold a NaN or an infinity (it returns False with a warning):
        saved, it would become the latest checkpoint, and retention would delete the last
        finite ones. A step older than the
        latest checkpoint is refused (ValueError): it would mix two runs in one directory.
        ``metrics`` (numbers or 0-d tensors) are stored with it and rank it for ``keep_best``.
        ``force`` saves even off ``save_interval_steps``.
        """
        if distributed.is_sharded(state):
            return self._save_sharded(state, metrics, force)
        return distributed.rank_zero_then_broadcast(
            lambda: self._save(state, metrics, force), f"save the checkpoint in {self.directory}")

    def _step_to_save(self, state: Any, force: bool) -> int | None:
        """The step ``state`` would be saved as, or None when ``save`` skips it."""
        if not isinstance(getattr(state, "step", None), torch.Tensor | int):
            raise TypeError(f"CheckpointManager.save numbers checkpoints by state.step; a "
                            f"{type(state).__name__} has none (use fx.checkpoint.save(path, "
                            "tree) for other trees)")
        step = int(state.step)
        if self.save_interval_steps and step % self.save_interval_steps and not force:
            return None
        return step

    def _admit(self, step: int) -> bool:
        """Whether ``step`` is new here; refuses one older than the latest checkpoint."""
        steps = self.all_steps()
        if step in steps:
            return False
        if steps and step < steps[-1]:
            raise ValueError(f"cannot save step {step} in {self.directory}: it already holds a "
                             f"later checkpoint (step {steps[-1]}), so this state is from "
                             "another run; resume from it, or use a new directory")
        self._writable()
        return True

    def _save_sharded(self, state: Any, metrics: Mapping | None, force: bool) -> bool:
        """Every rank writes its shards (``fxtrain.checkpoint.shards``); with ``async_save``
        in the background, completed by the next ``save``, ``wait`` or ``restore``."""
        step = self._step_to_save(state, force)
        if step is None:
            return False
        self.wait()
        if not distributed.rank_zero_then_broadcast(
                lambda: self._admit(step), f"save the checkpoint in {self.directory}"):
            return False
        if self._store is not None and self._staging is None:  # every rank stages its shards
            self._staging = Path(tempfile.mkdtemp(prefix="fxtrain-staging-"))
        floats = _floats(metrics)
        values, meta = bridge.table(state)
        bad = bridge.nonfinite(values, meta)  # each rank its shards; any rank's holds for all
        if distributed.agree([bool(bad)])[0]:
            if distributed.is_rank_zero():
                self._refuse(step, bad or ["a shard of another rank"])
            return False
        meta = store.meta_for(state, meta, floats, self.metadata)
        if self.async_save and self._group is None and distributed.initialized():
            self._group = shards.background_group()  # every rank, at the same save
        where = self.directory if self._store is None else self._staging
        self._pending_shards = shards.write(where / str(step), values, meta,
                                            finish=lambda: self._retain(step),
                                            background=self._group if self.async_save else None,
                                            store=self._store)
        return True

    def _refuse(self, step: int, bad: list[str]) -> None:
        """Warns that the state of ``step`` is not saved: its weights are not finite. Saving it
        would make it the latest checkpoint, and retention would delete the finite ones."""
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        latest = self.latest_step()
        kept = (f"the latest checkpoint stays step {latest}" if latest is not None
                else "no checkpoint was saved before it")
        warnings.warn(f"CheckpointManager: not saving step {step} in {self.directory}: its "
                      f"parameters are not finite ({bad[0]}{more}), and a checkpoint of them "
                      f"could only resume the failure; {kept}. To go on past non-finite steps, "
                      "train with fx.callbacks.nan_guard('skip') (or 'stop')",
                      RuntimeWarning, stacklevel=4)

    def _save(self, state: Any, metrics: Mapping | None, force: bool) -> bool:
        step = self._step_to_save(state, force)
        if step is None:
            return False
        self._wait_here()  # one save in flight at a time; raises if the previous one failed
        if not self._admit(step):
            return False
        floats = _floats(metrics)
        arrays, meta = bridge.encode(state)
        bad = bridge.nonfinite(arrays, meta)  # on the host copy: no device read
        if bad:
            self._refuse(step, bad)
            return False
        meta = store.meta_for(state, meta, floats, self.metadata)
        if not self.async_save:
            self._write(step, arrays, meta)
            return True
        # a snapshot: encode's arrays are views of the state's CPU tensors, which the next step
        # may overwrite in place (buffer donation) while this save is still being written
        job = (step, {k: a.copy() for k, a in arrays.items()}, meta)
        if self._writer is None:
            # orbax (and jax) imported here, not on the writer: an import on another thread
            # while Dynamo iterates sys.modules (compiling) failed the compile with
            # 'dictionary changed size during iteration'
            self._manager() if self._store is None else store.orbax()
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="fxtrain-checkpoint")
        self._pending = (step, self._writer.submit(self._write, *job))
        return True

    def wait(self) -> None:
        """Blocks until the save in flight is written and flushed to disk; raises its error.

        Under torch.distributed every rank calls it, and all return once rank 0's save is on
        disk (or raise its error).
        """
        if self._pending_shards is not None:  # every rank has it: sharded saves are collective
            complete, self._pending_shards = self._pending_shards, None
            complete()
        distributed.rank_zero_then_broadcast(
            self._wait_here, f"finish the checkpoint in {self.directory}")

    def _wait_here(self) -> None:
        if self._pending is not None:
            _, future = self._pending
            self._pending = None
            future.result()

    # -- reading ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The steps of the finished checkpoints, oldest first."""
        if self._store is not None:
            return self._store.steps()
        return store.steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step whose ``best_metric`` is best among the kept checkpoints, or None."""
        if not self.best_metric:
            raise ValueError("best_step needs a manager made with best_metric")
        self._wait_here()  # ranked as retention ranks them, after the save in flight
        values, _ = retention.metric_values(self._where, self.all_steps(), self.best_metric)
        ranked = retention.best_first(values, self.best_mode)
        return ranked[0] if ranked else None

    def _step_path(self, step: int | None) -> Path:
        self._wait_here()
        return layout.step_path(self.directory, step)

    def _chosen(self, step: int | None) -> int:
        """``step``, or the latest, checked to be a checkpoint in the store."""
        self._wait_here()
        return layout.chosen_step(self._store.steps(), step, self.directory)

    def info(self, step: int | None = None) -> dict:
        """The JSON description of a checkpoint: leaves, step, time, metrics, metadata."""
        if self._store is not None:
            return self._store.read_meta(self._chosen(step))
        return store.read_meta(self._step_path(step))

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with the checkpoint of ``step``."""
        return self.info(step).get("metrics", {})

    def restore(self, like: Any, step: int | None = None, *, only: Sequence[str] | None = None,
                cast: bool = False) -> Any:
        """A new state shaped like ``like`` from the checkpoint of ``step`` (default: latest).

        Args:
          like: the template: its structure, and its tensors' devices and dtypes.
          step: which checkpoint; None for the latest.
          only: top-level fields to take from the checkpoint (``("params", "buffers")`` to
            evaluate or fine-tune with another optimizer); the rest stay ``like``'s.
          cast: convert tensors whose dtype differs from the template's instead of refusing.

        Callbacks saved but absent from ``like`` are dropped with a warning; callbacks only in
        ``like`` keep its state (their ``init``). Any other difference raises
        ``CheckpointMismatchError`` listing the paths, before anything is read.

        Under torch.distributed every rank calls it: they wait for rank 0's save in flight,
        then each reads the same checkpoint.
        """
        self.wait()
        if self._store is not None:
            step = self._chosen(step)
        path = self.directory / str(step) if self._store is not None else self._step_path(step)
        try:
            if self._store is None:
                return _restore(path, like, only, cast)
            with remote.downloaded(self._store, step) as local:
                return _restore(local, like, only, cast, shown=path)
        except store.DamagedCheckpointError as e:
            others = [s for s in self.all_steps() if s != int(path.name)]
            raise store.DamagedCheckpointError(
                f"{e}. The other checkpoints in {self.directory}: steps {others} (restore(like, "
                "step=...) reads one; fit resumes from the newest readable one; verify(step) "
                "reads one completely)") from e

    def verify(self, step: int | None = None) -> dict:
        """Reads the checkpoint of ``step`` (default: latest) completely: its description, every
        array and their checksums. Returns its description, or raises
        ``DamagedCheckpointError`` naming what failed."""
        self.wait()
        if self._store is not None:
            with remote.downloaded(self._store, self._chosen(step)) as local:
                return store.verify(local)
        return store.verify(self._step_path(step))

    def set_aside(self, step: int) -> Path:
        """Renames the (damaged) checkpoint of ``step`` to ``<step>.damaged`` (kept for a look,
        no longer a checkpoint here), so the run can write that step again; returns the new path.
        Under torch.distributed every rank calls it; rank 0 renames."""
        def rename() -> Path | remote.Url:
            if self._store is not None:
                return self._store.set_aside(step)
            old, new = self.directory / str(step), self.directory / f"{step}.damaged"
            n = 1
            while new.exists():
                n += 1
                new = self.directory / f"{step}.damaged.{n}"
            old.rename(new)
            return new
        return distributed.rank_zero_then_broadcast(rename, f"set aside step {step} in "
                                                            f"{self.directory}")

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in flight and releases the writer thread and orbax."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
            if self._orbax is not None:
                self._orbax.close()
                self._orbax = None
            if self._group is not None:  # gloo threads must not outlive the interpreter
                if distributed.initialized():
                    torch.distributed.destroy_process_group(self._group)
                self._group = None
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointManager({str(self.directory)!r}, keep_latest={self.keep_latest}, "
                f"keep_best={self.keep_best}, best_metric={self.best_metric!r})")


def save(path: str | os.PathLike, state: Any, *, metrics: Mapping | None = None,
         metadata: Mapping | None = None) -> Path:
    """Writes one checkpoint of ``state`` at ``path`` (a new directory), synchronously.

    Refuses to replace an existing path, so nothing saved is ever overwritten.

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.adamw(1e-3), seed=0)
        >>> path = pathlib.Path(tmp.name) / "final"
        >>> path = fx.checkpoint.save(path, state, metadata={"lr": 1e-3})
        >>> path.name, sorted(p.name for p in path.iterdir())[:1]
        ('final', ['_CHECKPOINT_METADATA'])
        >>> fx.checkpoint.save(path, state)
        Traceback (most recent call last):
            ...
        FileExistsError: .../final already exists; fx.checkpoint.save never overwrites (choose a
        new path, or use a CheckpointManager)
        >>> tmp.cleanup()
    """
    if remote.is_url(path):
        return _save_remote(remote.Url(str(path)), state, metrics, metadata)
    path = Path(path).expanduser().absolute()

    def check() -> None:
        if path.exists():
            raise FileExistsError(f"{path} already exists; fx.checkpoint.save never overwrites "
                                  "(choose a new path, or use a CheckpointManager)")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save at {path}: {path.parent} does not exist")

    if distributed.is_sharded(state):  # every rank writes its shards
        distributed.rank_zero_then_broadcast(check, f"save at {path}")
        values, meta = bridge.table(state)
        shards.write(path, values, store.meta_for(state, meta, _floats(metrics),
                                                  dict(metadata or {})))
        return path
    check()
    arrays, meta = bridge.encode(state)
    store.write(path, arrays, store.meta_for(state, meta, _floats(metrics), dict(metadata or {})))
    return path


def restore(path: str | os.PathLike, like: Any, *, only: Sequence[str] | None = None,
            cast: bool = False) -> Any:
    """A new state shaped like ``like`` from the checkpoint at ``path``.

    ``path`` is one checkpoint (from ``fx.checkpoint.save`` or a manager's step directory) or a
    manager's directory (its latest checkpoint). ``only`` and ``cast`` as in
    ``CheckpointManager.restore``.

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.adamw(1e-3), seed=0)
        >>> path = fx.checkpoint.save(pathlib.Path(tmp.name) / "ckpt", state)
        >>> template = fx.TrainState.create(nn.Linear(2, 1), fx.optim.adamw(1e-3), seed=1)
        >>> restored = fx.checkpoint.restore(path, like=template)
        >>> fx.tree_digest(restored) == fx.tree_digest(state)
        True
        >>> other = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))  # another optimizer
        >>> weights = fx.checkpoint.restore(path, like=other, only=("params",))
        >>> torch.equal(weights.params["weight"], state.params["weight"])
        True
        >>> wider = fx.TrainState.create(nn.Linear(3, 1), fx.optim.adamw(1e-3))
        >>> fx.checkpoint.restore(path, like=wider)
        Traceback (most recent call last):
            ...
        fxtrain.checkpoint.bridge.CheckpointMismatchError: the checkpoint does not match the
        template state:
          shape of .opt_state[0].mu['weight']: checkpoint (1, 2), template (1, 3)
          shape of .opt_state[0].nu['weight']: checkpoint (1, 2), template (1, 3)
          shape of .params['weight']: checkpoint (1, 2), template (1, 3)
        >>> tmp.cleanup()
    """
    if remote.is_url(path):
        with remote.local_copy(path) as local:
            return _restore(local, like, only, cast, shown=path)
    path = Path(path).expanduser().absolute()
    if path.is_dir() and not store.is_checkpoint(path):  # a manager's directory: its latest
        path = layout.step_path(path)
    return _restore(path, like, only, cast)


def _save_remote(url: remote.Url, state: Any, metrics: Mapping | None,
                 metadata: Mapping | None) -> remote.Url:
    """``save`` to object storage: written in a local folder, uploaded, then committed."""
    parent = remote.Store(url.text.rpartition("/")[0])

    def check() -> None:
        parent.check_writable()
        if parent.exists(url.name):
            raise FileExistsError(f"{url} already exists; fx.checkpoint.save never overwrites "
                                  "(choose a new path, or use a CheckpointManager)")

    distributed.rank_zero_then_broadcast(check, f"save at {url}")
    staging = Path(tempfile.mkdtemp(prefix="fxtrain-staging-"))
    try:
        if distributed.is_sharded(state):
            values, meta = bridge.table(state)
            shards.write(staging / url.name, values, store.meta_for(
                state, meta, _floats(metrics), dict(metadata or {})), store=parent)
            return url

        def write() -> None:
            arrays, meta = bridge.encode(state)
            folder = staging / url.name
            store.write(folder, arrays, store.meta_for(state, meta, _floats(metrics),
                                                       dict(metadata or {})))
            parent.save_folder(folder, url.name)

        distributed.rank_zero_then_broadcast(write, f"save at {url}")
        return url
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore(path: Path, like: Any, only, cast: bool, shown: Any = None) -> Any:
    """``restore`` of one checkpoint, for ``restore`` and ``CheckpointManager.restore``: its
    warning points at their caller's line (naming ``shown``: where the checkpoint is, when
    ``path`` is its downloaded copy)."""
    state, p = store.restore_from(path, like, only=only, cast=cast)
    if p.dropped:
        warnings.warn(f"restoring {shown or path}: dropped the saved state of callbacks that are no "
                      f"longer present: {', '.join(p.dropped)}", stacklevel=3)
    return state
