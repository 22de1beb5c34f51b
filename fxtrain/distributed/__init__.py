"""``fx.distributed``: where this process stands in a torch.distributed job, the few collectives
fxtrain uses, and the run's parallel ``Layout``.

The process (``rank``, ``world_size``, ``init``, ``agree``, ``broadcast`` ...) is
``fxtrain.distributed._ranks``; the layout of a state (a ``Layout``, ``state.layout``: the
mesh, its roles, the units, the tensor-parallel plan, the tied names) is
``fxtrain.distributed._layout``; ``fx.shard`` (``fx.sharding``, the face of sharding) makes a
state of another layout (``_shard``, ``_meshes``, ``_units``, ``_tensor_parallel``), and a step
looks its gradient path up from the layout (``_strategies``, ``_collectives``). Modules outside
this folder use the names this file exports, never its private modules
(``tests/test_layers.py`` checks).

Examples:
    >>> fx.distributed.rank(), fx.distributed.world_size(), fx.distributed.data_world_size()
    (0, 1, 1)
"""

from __future__ import annotations

from typing import Any

from ._collectives import (for_forward, gather_params, local_nbytes, local_parts,
                           reduce_scatter_grads, replicated_like, with_whole_params)
from ._dtensors import gather_tensor, gathered, is_dtensor, is_sharded
from ._layout import Gather, Layout, Roles
from ._ranks import (DEFAULT_TIMEOUT, agree, all_gather, barrier, broadcast, init, initialized,
                     is_rank_zero, mean_in_step, rank, rank_zero, rank_zero_then_broadcast,
                     summed, world_size)
from ._shard import mesh, shard, unit_names
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
    batch (``rank()`` but under tensor parallelism, where the ranks of a group share one).
    ``state`` is a ``TrainState`` or its ``Layout``; None: a state ``fx.shard`` has not
    touched (every rank a replica)."""
    return _layout_of(state).data_rank()


def data_world_size(state: Any = None) -> int:
    """``state``'s data-parallel replicas: how many shares the global batch is cut into
    (``world_size()`` but under tensor parallelism). ``state``: as ``data_rank``'s."""
    return _layout_of(state).data_world_size()
