"""The process primitives of ``fx.distributed``: whether a process group is up, this process's
rank and the world's size, and the in-step reductions (traceable functional all-reduces). The
rest of ``fx.distributed``'s process functions are in its ``__init__.py``, built on these; the
modules of ``fxtrain/distributed/`` call these directly."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._torch import collectives


def initialized() -> bool:
    """Whether a torch.distributed process group is up (``init()`` or the user set one up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank, 0 without an initialized process group."""
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes, 1 without an initialized process group."""
    return torch.distributed.get_world_size() if initialized() else 1


def summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks by a functional all-reduce: traceable, and eagerly a tensor
    whose wait comes when it is first used, so work issued after it overlaps the reduction.
    Every rank gets the same bits (gloo hands every rank the one reduced result)."""
    return collectives.all_reduce(t, "sum", torch.distributed.group.WORLD)


def mean_in_step(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of each tensor, with one functional all-reduce per dtype: traceable,
    so it compiles into a step's graph (``torch.compile(fullgraph=True)``) without a sync."""
    n = world_size()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    for indices in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        total = collectives.all_reduce(flat, "sum", torch.distributed.group.WORLD)
        mean = total / n
        for i, part in zip(indices, mean.split([tensors[i].numel() for i in indices])):
            out[i] = part.reshape(tensors[i].shape)
    return out


def _leave() -> None:
    """At exit, leaves the group ``init`` joined, unless the program did: a process group left
    to the interpreter's teardown can abort the process (gloo: "terminate called without an
    active exception") after a run that succeeded."""
    if initialized():
        torch.distributed.destroy_process_group()
