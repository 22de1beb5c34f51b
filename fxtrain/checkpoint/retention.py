"""Retention: which checkpoints of a manager's directory stay. The rule, for every checkpoint
however it was written (orbax's, or a sharded one of ``fxtrain.checkpoint.shards``): the newest
``keep_latest`` together with the best ``keep_best`` by a metric, so the newest checkpoint is
never deleted.

It reads the directory as it is on disk (or in object storage: a ``remote.Store``) each time, with no list kept in memory that a checkpoint
set aside (``<step>.damaged``, no longer a step) or deleted by hand would leave stale, so a
deletion that failed is simply tried again by the next save.

A checkpoint ranks by the metric in its description (``fxtrain.checkpoint.layout``). One
without a finite value (not evaluated, NaN) or whose description is damaged does not rank: it
stays while it is among the newest. One whose description this process may not read
(permissions, an I/O error: not damage, so nothing is known of its metric) is left alone.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import layout
from .remote import Store


def best_first(values: Mapping[int, float], mode: str) -> list[int]:
    """The steps of ``values`` (step -> metric) with a finite value, best first.

    Of equal values the older step comes first: the first to reach a value is the best, as a
    strict-improvement tracker sees it (``checkpoint_policy``'s ``best_step``, the Trainer's
    ``best_model_checkpoint``), so retention keeps the checkpoint they point at.

    Examples:
        >>> best_first({4: 0.5, 2: 0.1, 3: float("nan"), 1: 0.1}, "min")
        [1, 2, 4]
        >>> best_first({4: 0.5, 2: 0.1, 1: 0.5}, "max")
        [1, 4, 2]
    """
    sign = 1.0 if mode == "min" else -1.0
    finite = [s for s, v in values.items() if math.isfinite(v)]
    return sorted(finite, key=lambda s: (sign * values[s], s))


def kept(steps: Sequence[int], values: Mapping[int, float], *, keep_latest: int,
         keep_best: int, mode: str) -> set[int]:
    """The steps retention keeps: the newest ``keep_latest`` of ``steps``, and the best
    ``keep_best`` of them by ``values`` (step -> metric; a step without a finite one does not
    rank) in ``mode`` ("min" or "max").

    Examples:
        >>> sorted(kept([1, 2, 3, 4], {1: 0.5, 2: 0.1, 3: 0.9, 4: float("nan")},
        ...             keep_latest=1, keep_best=1, mode="min"))
        [2, 4]
    """
    newest, present = sorted(steps)[max(len(steps) - keep_latest, 0):], set(steps)
    ranked = best_first({s: v for s, v in values.items() if s in present}, mode)
    return set(newest) | set(ranked[:keep_best])


def _steps(directory: Path | Store) -> list[int]:
    return directory.steps() if isinstance(directory, Store) else layout.steps(directory)


def _read_meta(directory: Path | Store, step: int) -> dict:
    if isinstance(directory, Store):
        return directory.read_meta(step)
    return layout.read_meta(directory / str(step))


def _delete(directory: Path | Store, step: int) -> None:
    if isinstance(directory, Store):
        directory.clear(step)
    else:
        shutil.rmtree(directory / str(step))


def metric_values(directory: Path | Store, steps: Sequence[int],
                  metric: str) -> tuple[dict[int, float], set[int]]:
    """``metric`` of each checkpoint of ``steps`` in ``directory`` (a folder, or a ``Store``)
    whose description holds a finite one, and the steps whose description this process may
    not read."""
    values, unread = {}, set()
    for step in steps:
        try:
            value = _read_meta(directory, step).get("metrics", {}).get(metric)
        except ValueError:  # damaged, or no longer a checkpoint: it does not rank
            continue
        except OSError:  # not readable here (or gone meanwhile): its metric is unknown
            unread.add(step)
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            values[step] = float(value)
    return values, unread


def prune(directory: Path | Store, *, keep_latest: int, keep_best: int, metric: str | None,
          mode: str) -> list[Exception]:
    """Deletes the checkpoints in ``directory`` that ``kept`` does not keep; returns the
    errors of the deletions that failed (those checkpoints stay, for a later call)."""
    steps = _steps(directory)
    values, unread = metric_values(directory, steps, metric) if keep_best else ({}, set())
    keep = kept(steps, values, keep_latest=keep_latest, keep_best=keep_best, mode=mode) | unread
    errors = []
    for step in steps:
        if step not in keep:
            try:
                _delete(directory, step)
            except Exception as e:  # noqa: BLE001 (a storage client's error: tried again later)
                errors.append(e)
    return errors
