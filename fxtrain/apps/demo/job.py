"""``fxtrain demo``: the main job, end to end.

Trains one of the tasks in ``tasks`` with the compiled functional step and the standard
callbacks, logs to TensorBoard and JSONL, checkpoints (periodic, best-N and final), resumes
exactly with ``--resume``, and ends with where everything went and the final metrics.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ... import callbacks as cb
from ... import distributed, optim
from ...logging.numbers import read_floats
from ...checkpoint import CheckpointManager
from ...loop._evaluation import evaluate
from ...data._batches import Batches
from ...donation import given_up
from ...logging import JsonlWriter, MultiWriter, TensorBoardWriter
from ...loop._fit import Interrupted, fit
from ...state import TrainState
from ...step._compile import compile as compile_step
from ...step._steps import make_eval_step, make_train_step
from ...tree import tree_digest
from .._exits import NONFINITE_EXIT
from .._nonfinite import message, watch
from .._workdir import WorkdirLocked, held
from . import figures
from .tasks import MODELS, Task, make_task, native_bf16

__all__ = ["DemoConfig", "DemoError", "run_demo"]

# flags that decide the trained state: a resume must use the same ones (the others, how often
# it logs, checkpoints, monitors or draws, are free to change)
RUN_FLAGS = ("model", "steps", "seed", "batch_size", "lr", "eval_every",
             "early_stopping_patience", "early_stopping_min_delta", "precision")


class DemoError(Exception):
    """A bad flag or workdir, said plainly; nothing in the workdir was changed."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's flags (``fxtrain demo --help``); None means the task's default."""

    model: str = "mlp"
    workdir: str | None = None
    steps: int | None = None
    seed: int = 0
    resume: bool = False
    batch_size: int | None = None
    lr: float | None = None
    eval_every: int = 100
    log_every: int = 25
    checkpoint_every: int = 250
    keep_best: int = 2
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 0.0
    grad_monitor_every: int = 100
    media_every: int = 500
    progress: bool = True
    compile: bool = True
    precision: str | None = None

    def resolved(self, task: Task) -> DemoConfig:
        """The config with the task's defaults filled in and the workdir chosen."""
        return dataclasses.replace(
            self, steps=self.steps or task.steps, batch_size=self.batch_size or task.batch_size,
            lr=self.lr if self.lr is not None else task.lr,
            precision=self.precision or task.precision,
            workdir=f"runs/demo-{self.model}" if self.workdir is None else self.workdir)


def _check(config: DemoConfig) -> None:
    if config.model not in MODELS:
        raise DemoError(f"--model must be one of {', '.join(MODELS)}, got {config.model!r}")
    positive = ("steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
                "grad_monitor_every", "media_every")
    for name in positive:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("keep_best", "early_stopping_patience", "early_stopping_min_delta"):
        if getattr(config, name) < 0:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.lr is not None and not config.lr > 0:
        raise DemoError(f"--lr must be > 0, got {config.lr}")
    if config.workdir is not None and not config.workdir.strip():
        raise DemoError("--workdir is empty")


def _check_task(config: DemoConfig, task: Task) -> None:
    """The checks that need the data: a batch must fit in the training set."""
    examples = len(task.train[1])
    if config.batch_size * distributed.world_size() > examples:
        raise DemoError(f"--batch-size {config.batch_size} (x {distributed.world_size()} "
                        f"processes) is larger than the {examples} training examples")


def _manager(config: DemoConfig, task: Task) -> CheckpointManager:
    """The workdir's checkpoints; refuses to mix two runs in one workdir."""
    workdir = Path(config.workdir)  # a directory: held() refused a file
    run = {k: getattr(config, k) for k in RUN_FLAGS}
    logs = [name for name in ("metrics.jsonl", "tensorboard") if (workdir / name).exists()]
    manager = CheckpointManager(workdir / "checkpoints", keep_latest=2, keep_best=config.keep_best,
                                best_metric=task.best_metric, best_mode=task.best_mode,
                                metadata={"demo": run})
    latest = manager.latest_step()
    if latest is None:
        if logs and not config.resume:
            raise DemoError(f"{workdir} holds the logs of an earlier run ({', '.join(logs)}) but "
                            "no checkpoint; --resume starts it again from step 0 and appends to "
                            "its logs, or give another --workdir. Nothing was changed.")
        if config.resume:
            _say(f"--resume: no checkpoint in {manager.directory} yet; starting at step 0")
        return manager
    if not config.resume:
        raise DemoError(f"{workdir} already holds a run (checkpoints up to step {latest}); "
                        "--resume continues it, or give another --workdir. Nothing was changed.")
    saved = manager.info(latest).get("metadata", {}).get("demo")
    if saved is None:
        raise DemoError(f"--resume: the checkpoints in {manager.directory} were not written by "
                        "fxtrain demo; give another --workdir. Nothing was changed.")
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {run[k]!r})"
              for k in RUN_FLAGS if saved.get(k) != run[k]]
    if differ:
        raise DemoError(f"--resume: the run in {workdir} was started with "
                        f"{', '.join(differ)}; resume it with the same flags, or give another "
                        "--workdir. Nothing was changed.")
    return manager


@distributed.rank_zero
def _say(*args: Any) -> None:
    print(*args, flush=True)


@distributed.rank_zero
def _say_error(line: str) -> None:
    print(f"\n{line}", file=sys.stderr, flush=True)


def _writer(workdir: Path):
    """TensorBoard and JSONL on rank 0; elsewhere a writer with nothing behind it."""
    if not distributed.is_rank_zero():
        return MultiWriter([])
    return MultiWriter([TensorBoardWriter(workdir / "tensorboard"),
                        JsonlWriter(workdir / "metrics.jsonl")])


def _callbacks(config: DemoConfig, task: Task, writer: Any, clock: dict) -> list:
    """The standard callbacks, each with its flag's knob."""

    def steady_clock(state, event):  # a plain function is a callback too
        if event.kind == "step_end" and "first" not in clock:  # the first step compiles
            clock["first"] = (event.step, time.perf_counter())
        elif event.kind == "train_end":
            clock["last"] = (event.step, time.perf_counter())

    return [
        cb.summary(),
        *([cb.progress_bar(["loss", "accuracy"])] if config.progress else []),
        cb.early_stopping("loss", patience=config.early_stopping_patience,
                          min_delta=config.early_stopping_min_delta, restore_best=True),
        cb.checkpoint_policy(every=config.checkpoint_every, mode=task.best_mode,
                             monitor=task.best_metric if config.keep_best else None),
        cb.grad_monitor(config.grad_monitor_every, writer=writer),
        cb.lr_monitor(config.log_every, writer=writer),
        cb.throughput(config.log_every, writer=writer),
        cb.log_metrics(writer, config.log_every, eval_prefix=None),
        cb.log_eval_metrics(writer),
        cb.log_hparams(writer, dataclasses.asdict(config)),
        task.media(writer, config.media_every),
        steady_clock,
    ]


def _optimizer(config: DemoConfig):
    warmup = min(max(1, config.steps // 20), config.steps - 1)  # 0 for a one-step run
    schedule = optim.warmup_cosine_decay_schedule(
        0.0, config.lr, warmup_steps=warmup, decay_steps=config.steps,
        end_value=config.lr * 0.01)
    return optim.chain(optim.clip_by_global_norm(1.0),
                       optim.adamw(schedule, weight_decay=1e-4))


def _report(config: DemoConfig, task: Task, state: Any, final: dict, clock: dict,
            start: float, manager: CheckpointManager) -> None:
    """Where everything went, the final metrics and the speed (rank 0)."""
    workdir = Path(config.workdir)
    lines = [f"tensorboard   tensorboard --logdir {workdir / 'tensorboard'}",
             f"metrics       {workdir / 'metrics.jsonl'}"]
    curve = figures.loss_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png",
                               f"fxtrain demo --model {config.model}")
    steps, best_saved = manager.all_steps(), manager.best_step()
    lines += [f"checkpoints   {manager.directory}: steps {steps}"
              + (f", best {task.best_metric} at step {best_saved}"
                 if config.keep_best and best_saved is not None else ""),
              f"              (fxtrain inspect {manager.directory})",
              f"loss curve    {curve}", *task.final(state, final, workdir)]
    print(f"\noutputs in {workdir}:", *("  " + line for line in lines), sep="\n")
    numbers = read_floats({k: v for k, v in final.items() if v.numel() == 1})  # one sync
    shown = "  ".join(f"{k} {v:.4f}" for k, v in numbers.items())
    stopping = (state.callbacks or {}).get("early_stopping")
    best = -1 if stopping is None else int(stopping.best_step)
    restored = (f", parameters of step {best}: early stopping's best"
                if 0 <= best != int(state.step) else "")
    print(f"\nfinal held-out metrics (step {int(state.step)}{restored}): {shown}")
    if task.target is not None and config.steps >= task.steps:
        met = numbers[task.headline] >= task.target
        print(f"target: {task.headline} >= {task.target}: {'met' if met else 'NOT MET'}")
    wall = time.perf_counter() - start
    if "first" in clock and "last" in clock and clock["last"][0] > clock["first"][0]:
        (s0, t0), (s1, t1) = clock["first"], clock["last"]
        print(f"time: {wall:.1f} s in all; {s1 - s0} steps in {t1 - t0:.1f} s after the first "
              f"(compiling) step: {(s1 - s0) / (t1 - t0):.0f} steps/s with every callback, "
              "evaluation and checkpoint")
    else:
        print(f"time: {wall:.1f} s in all (no new steps)")
    print(f"state digest: {tree_digest(state)} (the final state fit returned; `fxtrain inspect "
          "--digest` shows a checkpoint's)")


def run_demo(config: DemoConfig) -> int:
    """Runs the demo; returns the process exit status: 0, 130 when interrupted, 3
    (``NONFINITE_EXIT``) when nan_guard stopped it at a non-finite step.

    Under torch's deterministic algorithms (restored after): without them Inductor compiles an
    embedding's backward to atomic adds whose order varies from run to run, and a resumed run
    would not end bit for bit where an uninterrupted one does.
    """
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run_demo(config)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _run_demo(config: DemoConfig) -> int:
    start = time.perf_counter()
    _check(config)
    task = make_task(config.model, config.seed)
    chosen, config = config.precision, config.resolved(task)
    _check_task(config, task)
    with held(config.workdir):  # one run per workdir (workdir/.fxtrain.lock names it)
        return _locked(config, task, chosen, start)


def _locked(config: DemoConfig, task: Task, chosen: str | None, start: float) -> int:
    """The demo in its workdir, which this process holds."""
    manager = _manager(config, task)
    distributed.barrier()  # every rank has looked at the workdir before rank 0 writes logs in it
    workdir = Path(config.workdir)  # made by held()
    _say(f"fxtrain demo: {task.description}; {config.steps} steps of {config.batch_size}"
         + (f" per process on {distributed.world_size()}" if distributed.world_size() > 1 else "")
         + ("" if config.precision == "32" else f", precision {config.precision}"))
    if config.model == "transformer" and chosen is None and not native_bf16():
        _say("precision 32: this machine has no native bfloat16, where bf16-mixed is emulated "
             "and slower than float32 (--precision bf16-mixed uses it anyway)")

    in_step = [cb.nan_guard("stop")]  # tensor maths: runs inside the compiled step
    state = TrainState.create(task.model, _optimizer(config), seed=config.seed, callbacks=in_step)
    train_step = make_train_step(task.loss_fn, callbacks=in_step, grad_stats=True,
                                 precision=config.precision)
    eval_step = make_eval_step(task.eval_fn)
    if config.compile:  # fx.compile: a bfloat16 step's Inductor options on this CPU
        train_step = compile_step(train_step, state)
        eval_step = compile_step(eval_step, state)
    data = Batches(task.train, config.batch_size, seed=config.seed)
    # one batch of the whole held-out set (it is small); under torchrun each rank takes its share
    share = -(-len(task.test[1]) // distributed.world_size())
    eval_data = Batches(task.test, share, shuffle=False, drop_last=False)
    writer, clock = _writer(workdir), {}
    watcher, nonfinite = watch()  # whether nan_guard stopped the run, and at which metric
    try:
        state = fit(state, train_step, data, max_steps=config.steps, eval_step=eval_step,
                    eval_data=eval_data, eval_every=config.eval_every, checkpoint=manager,
                    callbacks=[*_callbacks(config, task, writer, clock), watcher],
                    resume=config.resume)
    except Interrupted as e:
        resume = f"Continue with: fxtrain demo {_flags(config)} --resume"
        if given_up(e.state):  # a second Ctrl-C inside a step: that step is not saved
            latest = manager.latest_step()
            saved = ("no checkpoint was saved yet" if latest is None else
                     f"the latest checkpoint, of step {latest}, is in {manager.directory}")
            _say(f"\nstopped inside a step; {saved}. {resume}")
        else:
            _say(f"\ninterrupted at step {int(e.state.step)}; its checkpoint is in "
                 f"{manager.directory}. {resume}")
        return 130
    finally:
        writer.close()
    final = evaluate(eval_step, state, eval_data)
    distributed.rank_zero(_report)(config, task, state, final, clock, start, manager)
    stop = nonfinite()
    if stop is None:
        return 0
    latest = manager.latest_step()
    other = "--precision 32 or a lower --lr" if config.precision != "32" else "a lower --lr"
    resume = "goes on from it" if latest is not None else "starts again from step 0"
    _say_error(message("fxtrain demo", stop, manager.directory, latest,
                       f"--resume {resume} with the same flags; other flags ({other}) start "
                       "again in another --workdir"))
    return NONFINITE_EXIT


def _flags(config: DemoConfig) -> str:
    """The command-line flags that repeat ``config`` (for the resume hint)."""
    defaults = DemoConfig()
    out = [f"--workdir {shlex.quote(config.workdir)}"]
    for field in dataclasses.fields(DemoConfig):
        name, value = field.name, getattr(config, field.name)
        if name in ("workdir", "resume") or value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append({"progress": "--no-progress", "compile": "--no-compile"}[name])
        else:
            out.append(f"{flag} {value}")
    return " ".join(out)


def main(config: DemoConfig) -> int:
    """``run_demo`` with a ``DemoError`` (or a workdir another run holds) printed as one line
    (exit status 2)."""
    try:
        return run_demo(config)
    except (DemoError, WorkdirLocked) as e:
        print(f"fxtrain demo: {e}", file=sys.stderr)
        return 2
