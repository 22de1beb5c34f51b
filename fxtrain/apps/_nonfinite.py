"""A run that ``nan_guard`` stopped ends visibly: exit status 3 (``NONFINITE_EXIT``) and one
line naming the step, the first non-finite metric, where the latest checkpoint is and
``fx.debug.find_nonfinite``.

The facts come from what the host is given anyway. ``watch()`` is a host callback: on each
step_end it keeps references to the step's ``loss`` and ``grad_norm`` (the metrics nan_guard
checks; nothing is read) for the last ``sync_every`` steps, and at train_end, when ``fit`` says
a nan_guard stopped the run (train_end's ``stopped_by``, made from the guard's ``stop_reason``),
it reads them in one transfer and finds the first that was not finite. nan_guard's stop is read
at most ``sync_every`` steps after the step it flagged, so that step is among them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..callbacks.nan_guard import NanGuardState
from ..protocol import NOTHING, Callback
from ._exits import NONFINITE_EXIT

WATCHED = ("loss", "grad_norm")  # what nan_guard checks, in the order a message names them
FIND = "fx.debug.find_nonfinite(train_step, state, batch)"


@dataclasses.dataclass(frozen=True)
class NonfiniteStop:
    """A run a nan_guard stopped: the step it stopped at, the guard's name, and the first
    watched step whose metric was not finite (``step``, ``metric``, ``value``; None when the
    metrics did not show it)."""

    stopped_at: int
    guard: str = "nan_guard"
    step: int | None = None
    metric: str | None = None
    value: float | None = None

    def what(self) -> str:
        """What went non-finite, where.

        Examples:
            >>> from fxtrain.apps._nonfinite import NonfiniteStop
            >>> NonfiniteStop(40, step=25, metric="loss", value=float("nan")).what()
            'the loss was nan at step 25'
            >>> NonfiniteStop(7, step=7, metric="grad_norm", value=float("inf")).what()
            'the gradient norm (grad_norm) was inf at step 7'
        """
        if self.metric is None:
            return "a step's loss or gradient norm was not finite"
        name = "the loss" if self.metric == "loss" else f"the gradient norm ({self.metric})"
        return f"{name} was {self.value} at step {self.step}"


def watch() -> tuple[Callback, Callable[[], NonfiniteStop | None]]:
    """A host callback for ``fit`` and a function that says, after ``fit`` returned, whether a
    nan_guard stopped it and at which metric (None: it did not)."""
    recent: collections.deque = collections.deque(maxlen=64)
    skipped: dict[str, torch.Tensor] = {}  # each guard's count at the start (a resumed run's)
    found: list[NonfiniteStop] = []

    def fn(state: Any, event: Any) -> tuple[Any, Any]:
        nonlocal recent
        if event.kind == "setup":  # after the restore; a flagged step is read <= sync_every later
            recent = collections.deque(maxlen=(event.metrics or {}).get("sync_every", 63) + 1)
            skipped.update({k: v.clone() for k, v in _guards(state).items()})  # donation
        elif event.kind == "step_end":
            metrics = event.metrics or {}
            recent.append((event.step, {k: metrics[k] for k in WATCHED
                                        if isinstance(metrics.get(k), torch.Tensor)}))
        elif event.kind == "train_end":
            guard = _stopping_guard(state, event.metrics or {}, skipped)
            if guard is not None:
                found.append(_first_nonfinite(recent, event.step, guard))
            recent.clear()
        return state, NOTHING

    callback = Callback("nonfinite_watch", init=None, fn=fn, host=True,
                        kinds=("setup", "step_end", "train_end"))
    return callback, lambda: found[-1] if found else None


def _guards(state: Any) -> dict[str, torch.Tensor]:
    """Each nan_guard's count of skipped steps in ``state``, by name (not read)."""
    return {name: s.skipped for name, s in (state.callbacks or {}).items()
            if isinstance(s, NanGuardState)}


def _stopping_guard(state: Any, end: dict, before: dict[str, torch.Tensor]) -> str | None:
    """The nan_guard that stopped the run, or None: ``fit``'s train_end names it among the
    callbacks that stopped the run (its ``stop_reason``: it skipped a step), and it skipped
    one in this run, not only before a resume (one read)."""
    if end.get("reason") != "stopped":
        return None
    said = str(end.get("stopped_by", "")).split("; ")
    named = {name: count for name, count in _guards(state).items()
             if any(s.startswith(f"{name}: ") for s in said)}
    if not named:
        return None
    counts = torch.stack([torch.stack([count, before.get(name, torch.zeros_like(count))])
                          for name, count in named.items()]).tolist()
    return next((name for name, (now, then) in zip(named, counts) if now > then), None)


def _first_nonfinite(recent: collections.deque, stopped_at: int, guard: str) -> NonfiniteStop:
    """The first step in ``recent`` with a metric that is not finite (one read of them all)."""
    entries = [(step, key, value) for step, metrics in recent for key, value in metrics.items()]
    if not entries:
        return NonfiniteStop(stopped_at, guard)
    flat = [value.detach().reshape(-1).float() for _, _, value in entries]
    read = torch.cat(flat).tolist()  # one transfer
    at = 0
    for (step, key, _), values in zip(entries, flat):
        bad = next((v for v in read[at:at + values.numel()] if not math.isfinite(v)), None)
        at += values.numel()
        if bad is not None:
            return NonfiniteStop(stopped_at, guard, step, key, bad)
    return NonfiniteStop(stopped_at, guard)


def message(prog: str, stop: NonfiniteStop, checkpoints: Path, latest: int | None,
            go_on: str) -> str:
    """The one line a command prints when a nan_guard stopped its run: ``prog`` the command,
    ``latest`` the newest checkpoint's step in ``checkpoints`` (None: none), ``go_on`` how to
    continue with other settings."""
    saved = (f"the latest checkpoint, of step {latest}, is in {checkpoints}" if latest is not None
             else f"no checkpoint was saved in {checkpoints} (a state whose last step "
                  "nan_guard flagged never is)")
    return (f"{prog}: stopped at step {stop.stopped_at}: {stop.what()} ({stop.guard} discarded "
            f"that step's update and stopped the run; exit status {NONFINITE_EXIT}); {saved}; "
            f"to see where it first appears, call {FIND} with the state before that step and "
            f"its batch; {go_on}")
