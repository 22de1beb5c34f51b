"""Debugging tools (``fx.debug``): the torch profiler over a window of steps, a graph-break
finder, Dynamo's explanation of a step, and a finder of the first non-finite value of a step.

``profiler`` records a few steps with ``torch.profiler`` and writes Chrome/TensorBoard traces;
``find_graph_breaks`` reads Dynamo's counters after the first compiled step and reports graph
breaks and recompiles; ``explain_step`` runs Dynamo's ``explain`` on an uncompiled step (both
through ``fxtrain._torch.dynamo``). All three are host-only: they read clocks, counters and
files. ``find_nonfinite`` reruns one step, eagerly op by op and compiled kernel by kernel, and
names the first operation whose output is not finite (``_find_nonfinite.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from .._torch import dynamo
from ..protocol import NOTHING, Callback
from ._find_nonfinite import find_nonfinite
from ._report import NonFinite

__all__ = ["profiler", "find_graph_breaks", "explain_step", "StepReport", "find_nonfinite",
           "NonFinite"]

logger = logging.getLogger("fxtrain")


def _make_logdir(logdir: str | os.PathLike) -> str:
    path = os.fspath(logdir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"profiler: cannot create logdir {path!r}: {e.strerror or e}") from e
    return path


def _trace_writer(logdir: str) -> Callable[[Any], None]:
    """An ``on_trace_ready`` handler: one ``<host>_<pid>.<ns>.pt.trace.json`` per window.

    The name is the one ``torch.profiler.tensorboard_trace_handler`` uses, so TensorBoard's
    profiler plugin reads ``logdir``; Perfetto and chrome://tracing open the file itself.
    """
    worker = f"{socket.gethostname()}_{os.getpid()}"

    def write(prof) -> None:
        path = os.path.join(logdir, f"{worker}.{time.time_ns()}.pt.trace.json")
        prof.export_chrome_trace(path)
        logger.info("profiler: trace of step %d written to %s (open it in ui.perfetto.dev, or "
                    "run tensorboard --logdir %s)", prof.step_num, path, logdir)

    return write


def profiler(logdir: str | os.PathLike, *, wait: int = 1, warmup: int = 1, active: int = 3,
             repeat: int = 1, record_shapes: bool = False, profile_memory: bool = False,
             with_stack: bool = False, name: str = "profiler") -> Callback:
    """Profiles the train loop with ``torch.profiler`` on a ``wait/warmup/active`` schedule.

    The profiler starts at train_begin and advances one schedule step per step_end: it skips
    ``wait`` steps, warms up for ``warmup``, records ``active`` steps and writes their trace
    into ``logdir``; this cycle runs ``repeat`` times (0: until training ends). At train_end it
    stops; a window cut short by the end of training is still written. Each trace is announced
    on the ``fxtrain`` logger. The open profiler is not part of the state: a resumed run
    profiles again from its own first step.

    Args:
      logdir: directory of the traces (created at train_begin).
      wait: steps skipped before each window (``torch.profiler.schedule``'s).
      warmup: steps traced but not recorded, after ``wait``.
      active: steps recorded in each window.
      repeat: windows to record (0: until training ends).
      record_shapes: passed to ``torch.profiler.profile``.
      profile_memory: passed to ``torch.profiler.profile``.
      with_stack: passed to ``torch.profiler.profile``.
      name: the callback's name.

    Returns:
      A host ``Callback`` without state.

    Examples:
        Skip one step, warm up on one, record the next two:

        >>> import json, os, tempfile
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> with tempfile.TemporaryDirectory() as logdir:
        ...     prof = fx.debug.profiler(logdir, wait=1, warmup=1, active=2)
        ...     state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=5,
        ...                    callbacks=[prof])
        ...     [trace] = os.listdir(logdir)  # open it in ui.perfetto.dev or TensorBoard
        ...     with open(os.path.join(logdir, trace)) as f:
        ...         events = json.load(f)["traceEvents"]
        >>> trace.endswith(".pt.trace.json")
        True
        >>> sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep")})
        ['ProfilerStep#2', 'ProfilerStep#3']
    """
    for arg, value, least in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                              ("repeat", repeat, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"profiler: {arg} must be an int >= {least}, got {value!r}")
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat)
    running: list[torch.profiler.profile] = []  # the open profiler; host-only, not state

    def stop() -> None:
        if running:
            running.pop().stop()

    def start() -> None:
        stop()
        prof = torch.profiler.profile(
            activities=sorted(torch.profiler.supported_activities(), key=str),
            schedule=schedule, on_trace_ready=_trace_writer(_make_logdir(logdir)),
            record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack)
        prof.start()
        running.append(prof)

    def fn(state, event):
        if event.kind == "train_begin":
            start()
        elif event.kind == "step_end" and running:
            running[0].step()
        elif event.kind == "train_end":
            stop()
        return state, NOTHING

    return Callback(name=name, init=None, fn=fn, kinds=("train_begin", "step_end", "train_end"),
                    host=True)


def _first_line(reason: str) -> str:
    return reason.strip().splitlines()[0] if reason.strip() else "(no reason given)"


def _describe_breaks(breaks: collections.Counter) -> str:
    return "; ".join(f"{n}x {_first_line(reason)}" for reason, n in breaks.most_common())


def find_graph_breaks(*, raise_on_break: bool = False, name: str = "find_graph_breaks") -> Callback:
    """Reports the graph breaks and recompiles of a ``torch.compile``-d train step.

    At train_begin it notes Dynamo's counters (``fxtrain._torch.dynamo``). After the
    first step it logs the graph breaks Dynamo met (with their reasons) and how many graphs it
    compiled; at train_end it logs the graphs compiled since the first step (recompiles: a
    fully traced, stable step has none) and any later breaks. The counters are global to the
    process, so a compiled eval step counts too. A step compiled with ``fullgraph=True`` fails
    at its first break instead; this callback is for ``fullgraph=False`` runs.

    Args:
      raise_on_break: raise a RuntimeError when the first step had graph breaks.
      name: the callback's name.

    Returns:
      A host ``Callback`` without state.

    Examples:
        A ``print`` in the loss breaks the graph. Dynamo alone finds breaks, so this compiles
        with a light backend; the reports go to the ``fxtrain`` logger, shown here:

        >>> import logging, sys
        >>> log = logging.getLogger("fxtrain")
        >>> show = logging.StreamHandler(sys.stdout)
        >>> log.addHandler(show)
        >>> log.setLevel(logging.INFO)
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     loss = ((state.apply(params, x) - y) ** 2).mean()
        ...     print("computing the loss")  # not traceable: a graph break
        ...     return loss
        >>> x = torch.randn(16, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> step = torch.compile(fx.make_train_step(loss_fn), backend="aot_eager")
        >>> state = fx.fit(state, step, data, max_steps=2,
        ...                callbacks=[fx.debug.find_graph_breaks()])  # raise_on_break=True raises
        computing the loss
        find_graph_breaks: Dynamo counted ... graph break(s) in the first step, ... graphs
        compiled: ...
        computing the loss
        find_graph_breaks: 0 graphs compiled after the first step (recompiles)
        >>> log.removeHandler(show)
        >>> log.setLevel(logging.NOTSET)
    """
    seen: dict[str, Any] = {}  # counters at train_begin and after the first step; host-only

    def first_step() -> None:
        breaks, graphs = dynamo.compile_counts()
        new_breaks = breaks - seen["breaks"]
        seen.update(after_first=(breaks, graphs))
        if not new_breaks:
            logger.info("find_graph_breaks: no graph breaks in the first step (%d graphs "
                        "compiled)", graphs - seen["graphs"])
            return
        message = (f"find_graph_breaks: Dynamo counted {sum(new_breaks.values())} graph "
                   f"break(s) in the first step, {graphs - seen['graphs']} graphs compiled: "
                   f"{_describe_breaks(new_breaks)}")
        logger.warning(message)
        if raise_on_break:
            raise RuntimeError(message + " (use fx.debug.explain_step(train_step, state, "
                               "batch) on the uncompiled step for the source lines)")

    def last_step() -> None:
        breaks, graphs = dynamo.compile_counts()
        breaks0, graphs0 = seen.get("after_first", (seen["breaks"], seen["graphs"]))
        recompiles, later = graphs - graphs0, breaks - breaks0
        log = logger.warning if recompiles or later else logger.info
        log("find_graph_breaks: %d graphs compiled after the first step (recompiles)%s",
            recompiles, f"; later graph breaks: {_describe_breaks(later)}" if later else "")

    def fn(state, event):
        if event.kind == "train_begin":
            seen.clear()
            seen["breaks"], seen["graphs"] = dynamo.compile_counts()
        elif event.kind == "step_end" and seen and "after_first" not in seen:
            first_step()
        elif event.kind == "train_end" and seen:
            last_step()
        return state, NOTHING

    return Callback(name=name, init=None, fn=fn, kinds=("train_begin", "step_end", "train_end"),
                    host=True)


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What Dynamo's ``explain`` found in a step: graphs, breaks and where they happen."""

    graph_count: int
    break_count: int
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{self.graph_count} graph(s), {self.break_count} graph break(s)"]
        lines += [f"  break {i + 1}: {r}" for i, r in enumerate(self.reasons)]
        return "\n".join(lines)


_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep,
                 os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)  # fxtrain/


def _user_frame(stack: list) -> str:
    """The innermost frame outside torch and fxtrain: the user's line that broke the graph."""
    user = [f for f in stack if not f.filename.startswith(_LIBRARY_DIRS)]
    frame = (user or stack or [None])[-1]
    return "" if frame is None else f" at {frame.filename}:{frame.lineno} in {frame.name}"


def explain_step(train_step: Callable, state: Any, batch: Any) -> StepReport:
    """Runs Dynamo's ``explain`` on one call of an uncompiled ``train_step``.

    It traces (and runs) the step once, and returns the number of graphs and the reason and
    source line of each graph break. Dynamo's caches are reset before and after
    (``torch.compiler.reset``), so compiled functions compile again on their next call.

    Args:
      train_step: the step as ``make_train_step`` returned it, not ``torch.compile``-d.
      state: the state of that call.
      batch: the batch of that call.

    Returns:
      A ``StepReport``; ``print(report)`` gives one line per break.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     loss = ((state.apply(params, x) - y) ** 2).mean()
        ...     print("computing the loss")  # not traceable: a graph break
        ...     return loss
        >>> x = torch.randn(4, 2)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> report = fx.debug.explain_step(fx.make_train_step(loss_fn), state,
        ...                                (x, x.sum(1, keepdim=True)))
        computing the loss
        >>> report.graph_count, report.break_count
        (2, 1)
        >>> print(report)
        2 graph(s), 1 graph break(s)
          break 1: ... at <doctest ...>:4 in loss_fn
    """
    out = dynamo.explain(train_step, state, batch)
    reasons = tuple(_first_line(b.reason) + _user_frame(b.user_stack) for b in out.breaks)
    return StepReport(out.graph_count, out.break_count, reasons)
