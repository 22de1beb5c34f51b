"""``memory_snapshot``: what a few steps hold in memory, written where a person can look, and
the report of an out-of-memory error inside ``fit``.

On CUDA the callback records the caching allocator's history (every allocation and free, with
its stack) over ``steps`` steps and writes a snapshot, which torch's memory viewer opens
(drag the file onto https://pytorch.org/memory_viz): the active memory over time, each block
with the code that allocated it. Beside it, a JSON file of the state's own accounting
(parameters, gradients, optimizer state, buffers, and the rest of the steps' peak: the
activations and temporaries). On the CPU there is no allocator history (torch records one for
CUDA only): the callback writes the same accounting, its peak measured from torch's CPU
allocator (``fxtrain._memory``).

An out-of-memory error (``torch.OutOfMemoryError``) raised inside ``fit`` gets a note that says
what the step held by that accounting, where a snapshot of the step is (on CUDA: the
callback's history when it is recording, else the allocator's segments at the failure) and
which levers lower each part. ``fit`` adds that note itself, this callback or not; with the
callback recording (``keep_recording=True``) the snapshot holds the allocations that led to
the failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._memory import Held, format_bytes, held, measured, out_of_memory
from .._torch import memory as cuda_memory
from .core import NOTHING, Callback

VIEWER = "https://pytorch.org/memory_viz"
MARK = "fxtrain: out of memory"  # the note's first words: it is added once
NO_HISTORY = ("the CPU has no allocator history (torch records it for CUDA only): this is the "
              "state's accounting, with the peak of torch's CPU allocator")


def _usable(path: Path) -> Path:
    """``path`` if the snapshot and its ``.json`` can be written there; else a ValueError that
    names the problem (checked when the callback is made, not at the recording's end)."""
    for target in (path, path.with_suffix(".json")):
        if target.is_dir():
            raise ValueError(f"memory_snapshot: {target} is a directory; give a file path "
                             f"such as {target / 'memory_snapshot.pickle'}")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"memory_snapshot: {parent} is a file, so {path} cannot be written "
                         "under it")
    return path


def memory_snapshot(steps: int = 3, path: str | os.PathLike = "memory_snapshot.pickle", *,
                    skip: int = 1, keep_recording: bool = False, max_entries: int = 100_000,
                    name: str = "memory_snapshot") -> Callback:
    """Writes a memory snapshot of ``steps`` steps to ``path``, and its accounting beside it.

    Args:
      steps: the steps recorded.
      path: the snapshot (CUDA: a pickle for https://pytorch.org/memory_viz); the accounting
        goes to the same name with ``.json``.
      skip: steps of this process run first, unrecorded (the first compiles).
      keep_recording: on CUDA, go on recording (the last ``max_entries`` events) after the
        snapshot, so that an out-of-memory error later writes one of the failing step.
      max_entries: the allocations and frees kept (the oldest are dropped).
      name: its name.

    Examples:
        On the CPU: the accounting, and why there is no history.

        >>> import json, tempfile
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(256, 16)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 64)
        >>> state = fx.TrainState.create(nn.Linear(16, 1), fx.optim.adam(1e-3))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=4, callbacks=[
        ...     fx.callbacks.memory_snapshot(2, f"{tmp.name}/memory.pickle")])
        fxtrain: memory of steps 2 to 3 (cpu): .../memory.json; the CPU has no allocator ...
        >>> written = json.load(open(f"{tmp.name}/memory.json"))
        >>> written["parameters"], written["gradients"], written["optimizer"], written["steps"]
        (68, 68, 156, [2, 3])
        >>> written["peak"] > written["gradients"]
        True
        >>> print(written["history"])
        the CPU has no allocator history (torch records it for CUDA only): this is the ...
        >>> tmp.cleanup()
    """
    if steps < 1 or skip < 0 or max_entries < 1:
        raise ValueError(f"memory_snapshot: steps >= 1, skip >= 0 and max_entries >= 1 are "
                         f"needed, got {steps}, {skip} and {max_entries}")
    path = _usable(Path(path))
    run: dict[str, Any] = {}  # this process: steps seen, the open measurement, the last peak
    window = contextlib.ExitStack()

    def begin(state):
        device = state.step.device
        run.update(seen=0, first=None, peak=None, device=device,
                   history=device.type == "cuda" and cuda_memory.available())
        if skip == 0:
            start(0)

    def start(step):
        run["first"] = step + 1
        if run["history"]:
            cuda_memory.record(max_entries)
        run["measure"] = window.enter_context(measured(run["device"]))

    def finish(state, step):
        window.close()
        run["peak"] = run.pop("measure").bytes
        if run["history"] and not keep_recording:
            cuda_memory.stop()
        if distributed.is_rank_zero():
            write(held(state, run["peak"]), run["first"], step)

    def write(accounting: Held, first: int, last: int) -> None:
        if run["history"]:
            cuda_memory.dump(path)
        about = {**accounting.as_dict(), "steps": [first, last],
                 "device": str(run["device"]),
                 "history": f"{path} (open it at {VIEWER})" if run["history"] else NO_HISTORY}
        try:  # a path that went bad since the callback was made: said, and training goes on
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json").write_text(json.dumps(about, indent=1) + "\n")
        except OSError as e:
            warnings.warn(f"memory_snapshot: could not write {path.with_suffix('.json')} "
                          f"({type(e).__name__}: {e}); training goes on without it",
                          stacklevel=2)
            return
        where = (f"{path} (open it at {VIEWER}) and {path.with_suffix('.json')}"
                 if run["history"] else f"{path.with_suffix('.json')}; {NO_HISTORY}")
        print(f"fxtrain: memory of steps {first} to {last} ({run['device'].type}): {where}",
              flush=True)

    def fn(state, event):
        if event.kind == "train_begin" or not run:
            begin(state)
        if event.kind == "step_end":
            run["seen"] += 1
            if run["seen"] == skip:
                start(event.step)
            elif "measure" in run and run["seen"] == skip + steps:
                finish(state, event.step)
        elif event.kind == "exception" and out_of_memory(event.error):
            window.close()  # a measurement open at the failure ends with it
            run.pop("measure", None)
            cuda = state.step.device.type == "cuda" and cuda_memory.available()
            explain(event.error, state, event.step, peak=run.get("peak"),
                    snapshot=_oom_path(path, event.step) if cuda else None)
        elif event.kind == "train_end":  # a run shorter than the window ends it too
            if "measure" in run:  # the steps it saw, written, and said to be fewer
                finish(state, event.step)  # (its window silences warnings: closed first)
                warnings.warn(f"memory_snapshot: the run ended {run['seen'] - skip} steps into "
                              f"the {steps} asked; wrote those", stacklevel=2)
            elif run.get("seen", 0) < skip or run.get("first") is None:
                warnings.warn(f"memory_snapshot: the run ended after {run.get('seen', 0)} "
                              f"steps, before the recording began (skip={skip}); nothing "
                              "was written", stacklevel=2)
            window.close()
            run.pop("measure", None)
            if run.get("history"):
                cuda_memory.stop()
        return state, NOTHING

    return Callback(name, None, fn, host=True,
                    kinds=("train_begin", "step_end", "exception", "train_end"))


def _rank() -> str:
    """``-rank<r>`` in a job of several ranks (each writes its own snapshot), else nothing."""
    return f"-rank{distributed.rank()}" if distributed.world_size() > 1 else ""


def _oom_path(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}-oom-step{step}{_rank()}{path.suffix}")


def default_snapshot(step: int) -> Path | None:
    """Where ``fit`` writes the allocator's snapshot of an out-of-memory error without the
    callback (None on the CPU, or where torch cannot write one)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()
            and cuda_memory.available()):
        return None
    return Path(tempfile.gettempdir()) / f"fxtrain-oom-step{step}{_rank()}-{os.getpid()}.pickle"


def explain(error: BaseException, state: Any, step: int, *, snapshot: Path | None,
            peak: int | None = None) -> None:
    """Adds the out-of-memory note to ``error`` (once): what the step held, the snapshot
    written to ``snapshot`` (CUDA; None: none), the levers. ``peak``: a step's peak measured
    before (the CPU's only source of the activations)."""
    if any(str(n).startswith(MARK) for n in getattr(error, "__notes__", ())):
        return
    device = state.step.device
    if device.type == "cuda":
        peak = max(torch.cuda.max_memory_allocated(device) - held(state).state, 0)
    accounting = held(state, peak)
    where = "no snapshot: " + NO_HISTORY.split(":")[0]
    if snapshot is not None:
        try:
            cuda_memory.dump(snapshot)
            where = f"a snapshot of the allocator: {snapshot} (open it at {VIEWER})"
        except Exception as e:  # the report must not hide the error
            where = f"no snapshot ({type(e).__name__}: {e})"
    error.add_note(
        f"{MARK} in the train step from step {step} on {device}. The step held, by the "
        f"state's accounting: {accounting.describe()}"
        + (" (the allocator's peak less the state and the gradients; the allocation that "
           "failed comes on top)" if device.type == "cuda" else
           "" if peak is not None else
           " (on the CPU a step's peak is measured by fx.callbacks.memory_snapshot)") + ".")
    error.add_note(f"fxtrain: {where}.")
    error.add_note(
        "fxtrain: levers: fx.remat around blocks, or the model's gradient checkpointing "
        "(activations; docs/memory.md); fx.losses.chunked_causal_lm (the logits of a large "
        "vocabulary); fx.shard(state) over more devices (parameters "
        f"{format_bytes(accounting.parameters)}, gradients and optimizer state); a smaller "
        "batch (fx.find_batch_size finds the largest that fits); precision='bf16-mixed'.")
