"""Where this process stands in a torch.distributed job, and the few collectives fxtrain uses
(``fx.distributed``).

Without an initialized process group every function here is the single-process identity:
rank 0 of 1, no communication. ``init()`` sets up the group from torchrun's environment.

Examples:
    >>> fx.distributed.rank(), fx.distributed.world_size(), fx.distributed.initialized()
    (0, 1, False)
    >>> fx.distributed.agree([False, True])  # any rank's True holds on all; alone, as given
    [False, True]
    >>> fx.distributed.broadcast({"seed": 7}), fx.distributed.all_gather(3)
    ({'seed': 7}, [3])
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._torch import collectives


DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
"""How long a collective waits for the other ranks before it fails (``init(timeout=...)``)."""


def initialized() -> bool:
    """Whether a torch.distributed process group is up (``init()`` or the user set one up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank, 0 without an initialized process group."""
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes, 1 without an initialized process group."""
    return torch.distributed.get_world_size() if initialized() else 1


def is_rank_zero() -> bool:
    """Whether this process is rank 0, the one that writes (every process is, alone).

    Examples:
        >>> fx.distributed.is_rank_zero()  # a single process is rank 0 of 1
        True
    """
    return rank() == 0


def rank_zero(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on rank 0 only; elsewhere the call does nothing and returns None.

    The function form of ``fx.callbacks.rank_zero``: for host work inside a callback that
    must itself run on every rank (a stateful monitor whose readings only rank 0 writes).

    Examples:
        >>> @fx.distributed.rank_zero
        ... def report(step, loss):
        ...     print(f"step {step}: loss {loss:.2f}")
        ...     return "written"
        >>> report(10, 0.25)  # on other ranks: nothing printed, None returned
        step 10: loss 0.25
        'written'
    """

    @functools.wraps(fn)
    def on_rank_zero(*args, **kwargs):
        return fn(*args, **kwargs) if is_rank_zero() else None

    return on_rank_zero


def rank_zero_then_broadcast(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on rank 0; every rank returns its result or raises its error (one broadcast).

    For work only rank 0 may do but every rank must wait on and agree about, such as writing a
    checkpoint. Without a process group, just ``fn()``. Another rank raises a RuntimeError
    naming ``what`` (rank 0 failed to ``what``) and rank 0's error.

    Examples:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     def write():  # only rank 0 touches the disk; every rank gets the path
        ...         path = os.path.join(d, "config.json")
        ...         with open(path, "w") as f:
        ...             f.write("{}")
        ...         return os.path.basename(path)
        ...     fx.distributed.rank_zero_then_broadcast(write, "write the config")
        'config.json'
        >>> fx.distributed.rank_zero_then_broadcast(lambda: 1 / 0, "divide")  # raised on every rank
        Traceback (most recent call last):
        ...
        ZeroDivisionError: division by zero
    """
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_rank_zero():
        try:
            result = fn()
        except Exception as e:
            error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    result, message = broadcast((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not {what}: {message}")
    return result


def init(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Joins the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... in the
    environment); returns whether this is a multi-process run.

    ``backend`` defaults to nccl with CUDA and gloo otherwise; with CUDA each process takes the
    GPU of its ``LOCAL_RANK``. A collective that waits longer than ``timeout`` (a rank died or
    hangs) raises instead of blocking for ever. Without torchrun's variables (or with one
    process) nothing is initialized. The group is left at exit if the program has not left it.

    Examples:
        >>> fx.distributed.init()  # not started by torchrun: one process, no group to join
        False
    """
    if initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timeout)
    atexit.register(_leave)
    return True


def _leave() -> None:
    """At exit, leaves the group ``init`` joined, unless the program did: a process group left
    to the interpreter's teardown can abort the process (gloo: "terminate called without an
    active exception") after a run that succeeded."""
    if initialized():
        torch.distributed.destroy_process_group()


def _device() -> torch.device:
    """Where the collectives' small host-side tensors live for this backend."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flags: Sequence[bool]) -> list[bool]:
    """Each flag true on any rank is true on all (one small all-reduce)."""
    if world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits until every rank gets here (nothing to wait for alone)."""
    if world_size() > 1:
        torch.distributed.barrier()


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
