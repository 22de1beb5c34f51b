"""K steps per call: the rules that ``make_train_step(..., steps_per_call=K)`` and ``fx.fit``
share.

A step built with ``make_train_step(..., steps_per_call=K)`` takes K stacked
batches. ``fit`` then takes K batches from the stream, stacks them (``torch.stack`` per leaf),
calls the step once and advances ``step`` by K. The host sees only call boundaries:
- host callbacks get one step_end per call, at the call's last step, with that step's metrics
  (its ``control/*`` flags OR-ed over the K steps);
- the run must start at a multiple of K (``state.step``, after resuming), and ``max_steps``,
  ``eval_every``, the ``steps_per_epoch`` of data with a length and the period of every
  periodic host callback (``every(n, ...)``, ``checkpoint_policy(every=n)``) must be multiples of K,
  else a ValueError names both numbers; data without a length whose epoch ends inside a
  group of K is the same error, when it happens;
- tensor flags are read at the end of each call that reaches or passes a multiple of
  ``sync_every`` (so any ``sync_every`` works; the lag is up to ``sync_every + K - 1`` steps);
- a host callback that may skip a step (``skips=True``) is refused: skip inside the step.
Every call boundary is an ordinary state (positions count batches), so checkpoints and resumes
work as with single steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from ..data._batches import length_of
from ..data._feed import plain_tensors
from ..protocol import Callback


def unstack(batches: Any) -> list:
    """The batches stacked in ``batches``, in order (each leaf unbound along dimension 0)."""
    leaves, spec = pytree.tree_flatten(batches)
    return [pytree.tree_unflatten(list(parts), spec)
            for parts in zip(*(leaf.unbind(0) for leaf in leaves))]


def check_stacked(batches: Any, k: int) -> None:
    """Every leaf of ``batches`` is a tensor with a leading dimension ``k``."""
    for path, leaf in pytree.tree_flatten_with_path(batches)[0]:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0 or leaf.shape[0] != k:
            what = f"shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else \
                type(leaf).__name__
            raise ValueError(
                f"train_step(steps_per_call={k}) takes {k} stacked batches (each leaf with a "
                f"leading dimension {k}, e.g. torch.stack of {k} batches); "
                f"{pytree.keystr(path) or 'batch'} has {what}")


def check_calls(k: int, start: int, max_steps, eval_every, stream, callbacks: tuple) -> None:
    """The rules for K steps per call (see the module): intervals at call boundaries."""
    if k == 1:
        return
    periodic = [(f"the period of host callback {cb.name}", cb.period) for cb in callbacks
                if isinstance(cb, Callback) and cb.period > 1 and "step_end" in cb.kinds]
    for label, value in [("the start step (state.step)", start), ("max_steps", max_steps),
                         ("eval_every", eval_every), ("steps_per_epoch", length_of(stream)),
                         *periodic]:
        if value is not None and value % k:
            raise ValueError(f"fit: {label} is {value}, not a multiple of the step's "
                             f"steps_per_call={k}; with {k} steps per call the host only sees "
                             f"every {k}th step")
    for cb in skipping(callbacks):
        raise ValueError(f"fit: host callback {cb.name} may skip a step, but the step takes "
                         f"steps_per_call={k} steps per call; pass it to make_train_step(..., "
                         "callbacks=[...]) instead, where it skips single steps")


def take(stream: Any, position: Any, k: int) -> tuple[Any, Any, bool]:
    """The next ``k`` batches stacked along a new first dimension (one batch when ``k`` is 1),
    the position after them, and whether they ended an epoch (only the last may)."""
    if k == 1:
        return stream.next(position)
    at_once = getattr(stream, "next_stacked", None)  # Batches: one take for the k batches
    taken = at_once(position, k) if at_once is not None else None
    if taken is not None:
        return taken
    batches = []
    for i in range(k):
        batch, position, epoch_done = stream.next(position)
        if batches and _shapes(batch) != _shapes(batches[0]):
            raise ValueError(f"fit: batch {i + 1} of a call of steps_per_call={k} has shapes "
                             f"{_shapes(batch)}, the first {_shapes(batches[0])}: the batches "
                             "of one call are stacked, so they must be alike (a short last batch "
                             "of an epoch? Batches(..., drop_last=True) leaves it out)")
        batches.append(batch)
        if epoch_done and i < k - 1:
            raise ValueError(f"fit: an epoch of the data ended after batch {i + 1} of a call "
                             f"of steps_per_call={k}; make the batches per epoch a multiple "
                             f"of {k} (an epoch resumed on another batch size or number of "
                             "processes has its own number of batches left: resume it on the "
                             "layout that wrote the checkpoint, or finish that epoch with "
                             "steps_per_call=1)")
    return stacked(batches), position, epoch_done


def _shapes(batch: Any) -> list:
    return [tuple(leaf.shape) for leaf in pytree.tree_leaves(batch)
            if isinstance(leaf, torch.Tensor)]


def stacked(batches: list) -> Any:
    """The batches' tensors stacked along a new first dimension, in the batches' structure
    (plain batches directly, see ``plain_tensors``; other pytrees through torch's pytree)."""
    first, columns = batches[0], [plain_tensors(b) for b in batches]
    if all(c is not None and type(b) is type(first) and len(c) == len(columns[0])
           and (type(b) is not dict or b.keys() == first.keys())
           for b, c in zip(batches, columns)):
        stacks = [torch.stack(column) for column in zip(*columns)]
        return dict(zip(first, stacks)) if type(first) is dict else type(first)(stacks)
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *batches)


def skipping(callbacks: tuple) -> list[Callback]:
    """The host callbacks that may skip a step (undoing it needs the step's old values, so fit
    does not donate, and it cannot undo one inner step of K)."""
    return [cb for cb in callbacks if isinstance(cb, Callback) and cb.skips
            and "step_end" in cb.kinds]
