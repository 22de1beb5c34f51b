"""``fx.distributed``: where this process stands in a torch.distributed job, the few collectives
fxtrain uses, and the run's parallel ``Layout``.

Without an initialized process group every process function here is the single-process
identity: rank 0 of 1, no communication. ``init()`` sets up the group from torchrun's
environment. The layout of a state (a ``Layout``, ``state.layout``: the mesh, its roles, the
units, the tensor-parallel plan, the tied names) is ``_layout.py``; ``fx.shard`` (``fx.sharding``,
the face of sharding) makes a state of another layout (``_shard.py``, ``_meshes.py``,
``_units.py``, ``_tensor_parallel.py``), and a step looks its gradient path up from the layout
(``_strategies.py``, ``_collectives.py``). Modules outside this folder use the names this file
exports, never its private modules (``tests/unit/test_layers.py`` checks). The process primitives
(``rank``, ``world_size``, ``initialized``, the in-step means) are ``_ranks.py``, which this
folder's modules call; the functions built on them are here and call them through this module,
so replacing one here (a test's ``monkeypatch.setattr(fx.distributed, "rank", ...)``) holds
for ``is_rank_zero``, ``broadcast`` and the rest.

Examples:
    >>> fx.distributed.rank(), fx.distributed.world_size(), fx.distributed.initialized()
    (0, 1, False)
    >>> fx.distributed.agree([False, True])  # any rank's True holds on all; alone, as given
    [False, True]
    >>> fx.distributed.broadcast({"seed": 7}), fx.distributed.all_gather(3)
    ({'seed': 7}, [3])
    >>> fx.distributed.data_world_size()  # a state fx.shard has not touched: every rank
    1
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._ranks import _leave, initialized, mean_in_step, rank, summed, world_size


DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
"""How long a collective waits for the other ranks before it fails (``init(timeout=...)``)."""


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


# the layout and sharding: after the process functions, which the modules below call here
from ._collectives import (for_forward, frozen_for_forward, gather_params, local_nbytes,
                           local_parts, reduce_scatter_grads, replicated_like,
                           with_whole_params)
from ._context import sliced as context_sliced
from ._context import slots as context_slots
from ._dtensors import gather_tensor, gathered, is_dtensor, is_sharded
from ._layout import Context, Gather, Layout, Roles
from ._offload import to_devices, to_host
from ._shard import mesh, shard, unit_names
from ._slices import held_box, local_box
from ._strategies import (DataParallel, Reduced, Sharded, SingleProcess, TensorParallel,
                          strategy)
from ._tensor_parallel import plan_of

__all__ = ["rank", "world_size", "initialized", "init", "is_rank_zero", "rank_zero",
           "rank_zero_then_broadcast", "agree", "broadcast", "barrier", "all_gather",
           "mean_in_step", "DEFAULT_TIMEOUT", "Layout", "tensor_parallel_size", "data_rank",
           "data_world_size"]  # mean_in_step: for a step of your own


def _layout_of(state: Any) -> Layout:
    if state is None:  # a state fx.shard has not touched: every rank a data replica
        return Layout()
    return state if isinstance(state, Layout) else state.layout


def tensor_parallel_size(state: Any = None) -> int:
    """The ranks that hold one copy of ``state``'s model between them (``fx.shard(state,
    tp_plan=...)``; 1 otherwise): they train on the same batch. ``state`` is a ``TrainState``
    or its ``Layout``; None: a state ``fx.shard`` has not touched.

    Examples:
        >>> fx.distributed.tensor_parallel_size(fx.TrainState.create(nn.Linear(2, 1),
        ...                                                          fx.optim.sgd(0.1)))
        1
    """
    return _layout_of(state).tensor_parallel_size()


def data_rank(state: Any = None) -> int:
    """This process's rank among ``state``'s data-parallel replicas: its share of the global
    batch (``rank()`` but under tensor and context parallelism, where the ranks of a group
    share one).
    ``state`` is a ``TrainState`` or its ``Layout``; None: a state ``fx.shard`` has not
    touched (every rank a replica)."""
    return _layout_of(state).data_rank()


def data_world_size(state: Any = None) -> int:
    """``state``'s data-parallel replicas: how many shares the global batch is cut into
    (``world_size()`` but under tensor and context parallelism). ``state``: as
    ``data_rank``'s."""
    return _layout_of(state).data_world_size()
