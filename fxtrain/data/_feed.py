"""Batches onto the state's device: pinned, copied without blocking, one step call ahead on CUDA.

``to_device`` moves one batch. ``Feed`` gives ``fit`` the batches of each step call on the
device; on CUDA it takes the next call's batches while the step runs (``prefetch``), page-locks
them and starts their copy on a side stream, so the copy overlaps the step and the next
``take`` finds them there. Positions are values, so a batch taken ahead is used only if the loop
asks for the position it was taken at; otherwise it is dropped and taken again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree


def to_device(batch: Any, device: torch.device | str, *, pin: bool = False) -> Any:
    """``batch`` with every tensor on ``device`` (copied without blocking where the source
    allows it: pinned CPU memory to a GPU); tensors already there and other leaves as they are.

    Args:
      batch: any pytree of tensors and other leaves.
      device: where the tensors go.
      pin: page-lock CPU tensors first when the device is a GPU, so the copy runs
        asynchronously; ``fit`` does this for the batches it takes ahead.

    Examples:
        >>> batch = {"x": torch.ones(2, 3), "label": "cat"}
        >>> moved = fx.to_device(batch, "meta")  # any device: "cuda", state.step.device...
        >>> moved["x"].device, moved["label"]
        (device(type='meta'), 'cat')
        >>> fx.to_device(batch, "cpu") is batch  # already there: the same object
        True
    """
    device = torch.device(device)
    if _already_on(batch, device):
        return batch
    pin = pin and device.type == "cuda"

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        if pin and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return pytree.tree_map(move, batch)


def plain_tensors(batch: Any) -> list[torch.Tensor] | None:
    """The tensors of the common batch, a tuple, list or dict of plain tensors, in its order;
    None for any other batch (walk that with torch's pytree). The per-step checks of ``fit``
    (the device, the guard-skip signature, stacking K batches) read these directly."""
    kind = type(batch)
    if kind is dict:
        leaves = list(batch.values())
    elif kind is tuple or kind is list:
        leaves = list(batch)
    else:
        return None
    return leaves if all(type(t) is torch.Tensor for t in leaves) else None


def _already_on(batch: Any, device: torch.device) -> bool:
    """Whether every tensor of ``batch`` is on ``device``."""
    leaves = plain_tensors(batch)
    if leaves is not None:
        return all(t.device == device for t in leaves)
    return all(not isinstance(t, torch.Tensor) or t.device == device
               for t in pytree.tree_leaves(batch))


def prefetches(device: torch.device) -> bool:
    """Whether ``fit`` takes batches one call ahead on ``device``: on CUDA, where the copy then
    overlaps the step (on the CPU there is nothing to overlap)."""
    return device.type == "cuda"


class Feed:
    """The batches of each step call, on ``device``.

    ``take(position)`` returns ``(batch, position after it, epoch ended)`` like a stream's
    ``next`` (and raises what it raises), with the batch on ``device``. With ``ahead``,
    ``prefetch(position)`` takes that call now and starts its copy (on CUDA: page-locked, on a
    side stream); ``take`` of the same position object returns it, after making the compute
    stream wait for the copy. An error met while taking ahead is raised by that ``take``, so
    errors surface where they would without prefetching.
    """

    def __init__(self, take: Callable[[Any], tuple[Any, Any, bool]], device: torch.device,
                 ahead: bool):
        self._take, self.device, self.ahead = take, device, ahead
        self._copies = torch.cuda.Stream(device) if ahead and device.type == "cuda" else None
        self._next: tuple | None = None  # (position, result or exception)

    def take(self, position: Any) -> tuple[Any, Any, bool]:
        ahead, self._next = self._next, None
        if ahead is None or ahead[0] is not position:
            batch, after, done = self._take(position)
            return to_device(batch, self.device), after, done
        if isinstance(ahead[1], BaseException):
            raise ahead[1]
        batch, after, done = ahead[1]
        if self._copies is not None:  # the step may use the batch once its copy is done
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._copies)
            for leaf in pytree.tree_leaves(batch):
                if isinstance(leaf, torch.Tensor) and leaf.device == self.device:
                    leaf.record_stream(compute)  # its memory is not reused before the step ends
        return batch, after, done

    def prefetch(self, position: Any) -> None:
        """Takes the call at ``position`` now (a no-op without ``ahead``)."""
        if not self.ahead:
            return
        try:
            batch, after, done = self._take(position)
            if self._copies is None:
                moved = to_device(batch, self.device)
            else:
                with torch.cuda.stream(self._copies):
                    moved = to_device(batch, self.device, pin=True)
            self._next = (position, (moved, after, done))
        except Exception as e:  # noqa: BLE001 - raised by the take that asks for it
            self._next = (position, e)
