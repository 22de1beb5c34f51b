"""A sharded ``TrainState`` (FSDP-style) on ``torch.distributed.tensor``.

``fx.shard(state)`` turns every parameter, and the optimizer state that has a parameter's shape,
into a ``DTensor`` split along its first dimension over a 1-D ``DeviceMesh`` of all the ranks
(``Shard(0)``; 0-d tensors are replicated): each rank holds about 1/N of the parameters and
optimizer state. ``make_train_step`` sees the DTensors and, inside its one compiled graph,
all-gathers the parameters before the forward and backward, reduce-scatters (averages) the
gradients onto each rank's shard, and runs the optimizer on the shards, as DTensor operations:
global norms (clipping, ``grad_norm``) reduce over the ranks by themselves. Buffers stay whole
and are averaged as in data parallel. Sharding is data parallel too: every rank takes its own
share of the global batch (``fx.data.Batches`` splits it under torchrun).

The parameters are gathered whole for the step (as FSDP does with one unit that is not
resharded after the forward): the state costs 1/N per rank, a step's transient peak holds the
full parameters and gradients once.

Checkpoints of a sharded state are sharded too (``fx.checkpoint``): each rank writes its own
shards with ``torch.distributed.checkpoint``, and a checkpoint restores onto any number of ranks.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import distributed

__all__ = ["shard", "mesh", "is_dtensor", "is_sharded", "gathered", "gather_tensor",
           "with_whole_params", "reduce_scatter_like", "local_nbytes"]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing the module)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def is_sharded(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a DTensor (a state made by ``fx.shard``)."""
    return "torch.distributed.tensor" in sys.modules and any(
        is_dtensor(leaf) for leaf in pytree.tree_leaves(tree))


@functools.cache
def _mesh(device_type: str, size: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (size,), mesh_dim_names=("shard",))


def mesh():
    """The 1-D ``DeviceMesh`` over every rank of the process group (made once per process),
    on CUDA under NCCL and on the CPU otherwise."""
    if not distributed.initialized():
        raise RuntimeError("fx.shard needs an initialized process group: start the program "
                           "with torchrun and call fx.distributed.init() first")
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return _mesh(device, distributed.world_size())


def _placements(t: torch.Tensor) -> list:
    from torch.distributed.tensor import Replicate, Shard
    return [Shard(0)] if t.ndim >= 1 else [Replicate()]


def shard(state: Any, mesh: Any = None) -> Any:
    """``state`` with its parameters and their optimizer state sharded across the ranks.

    Every rank calls it with its state; rank 0's values are the ones scattered, so ranks that
    built their models differently still start alike. The optimizer state is matched to the
    parameters through ``state.tx.init``: its leaves that ``init`` makes from a parameter are
    sharded like that parameter; counts, schedules and other small leaves stay whole.
    Callback states and buffers stay whole (replicated) on every rank.

    Args:
      state: a ``TrainState`` (not already sharded).
      mesh: a 1-D ``DeviceMesh``; default ``fx.sharding.mesh()``, every rank.

    Returns:
      The sharded state: ``state.params[name]`` is a ``DTensor`` whose ``.to_local()`` is this
      rank's rows, ``.full_tensor()`` (a collective: every rank calls it) the whole parameter.
    """
    from torch.distributed.tensor import distribute_tensor
    if is_sharded(state.params):
        raise ValueError("fx.shard: this state is already sharded")
    mesh = mesh if mesh is not None else globals()["mesh"]()
    if mesh.ndim != 1:
        raise ValueError(f"fx.shard takes a 1-D DeviceMesh, got one of shape {tuple(mesh.shape)}")
    params = {k: distribute_tensor(p, mesh, _placements(p)) for k, p in state.params.items()}
    template = state.tx.init(params)  # which optimizer leaves follow a parameter's layout
    flat, spec = pytree.tree_flatten(state.opt_state)
    like, like_spec = pytree.tree_flatten(template)
    if spec != like_spec:
        raise ValueError("fx.shard: the optimizer state does not have the structure "
                         "state.tx.init gives; shard the state its TrainState.create made")
    opt = [distribute_tensor(leaf, mesh, t.placements) if is_dtensor(t) else leaf
           for leaf, t in zip(flat, like)]
    return state.replace(params=params, opt_state=pytree.tree_unflatten(opt, spec))


def gather_tensor(t: Any) -> Any:
    """The whole tensor of a DTensor (all-gathered: a collective), anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def gathered(tree: Any) -> Any:
    """``tree`` with its DTensors gathered whole (a collective: every rank calls it)."""
    if not is_sharded(tree):
        return tree
    return pytree.tree_map(gather_tensor, tree)


def with_whole_params(state: Any) -> Any:
    """``state`` with its parameters gathered whole once, for a loop over batches whose count
    may differ between ranks (evaluation, prediction): a gather per batch would then be a
    collective that some ranks never reach."""
    return state.replace(params=gathered(state.params)) if is_sharded(state.params) else state


def reduce_scatter_like(grad: torch.Tensor, param: Any) -> Any:
    """A full-size gradient of this rank, averaged over the ranks into ``param``'s layout (a
    reduce-scatter onto each rank's shard; an all-reduce for a replicated parameter)."""
    if not is_dtensor(param):
        return grad
    from torch.distributed.tensor import DTensor, Partial
    partial = DTensor.from_local(grad, param.device_mesh, [Partial("avg")], run_check=False)
    return partial.redistribute(param.device_mesh, param.placements)


def local_nbytes(tree: Any) -> int:
    """The bytes of ``tree``'s tensors held by this rank (a DTensor's local shard only).

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(4, 2), fx.optim.adam(1e-3))
        >>> fx.sharding.local_nbytes(state.params)  # 2x4 + 2 float32 values, unsharded
        40
    """
    return sum((leaf.to_local() if is_dtensor(leaf) else leaf).nbytes
               for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))
