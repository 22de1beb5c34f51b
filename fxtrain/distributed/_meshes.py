"""Two-dimensional layouts: what each dimension of a ``DeviceMesh`` does to a state's
parameters, how a step gathers them for the forward and how it reduces their gradients.

``fx.shard(state, mesh)`` with a 2-D mesh (see ``fxtrain.distributed``) takes one of two layouts:

- **FSDP x tensor parallel** (a ``tp_plan`` given): the mesh's first dimension shards, its
  second runs the plan. A planned layer's weight is split by the plan over the second
  dimension (its ``Shard(d)``) and, along another tensor dimension, over the first (FSDP);
  everything else is sharded over the first dimension and whole along the second. Ranks of one
  row of the mesh (one tensor-parallel group) train on the same batch.
- **HSDP** (no plan): the first dimension replicates, the second shards: each group along the
  second dimension holds one sharded copy of the state, and the copies train on their own
  shares of the batch.

In both, the data dimension's shard is gathered (all-gather over that dimension's group, along
the tensor dimension it splits) just before the forward needs it: for the whole model once per
step, or a unit's own parameters in its forward (``fxtrain.distributed._units``). A planned parameter then
becomes the DTensor the plan's layer computes with (on the tensor-parallel dimension alone),
any other a plain tensor. The gather's backward reduce-scatters the gradient over the shard
dimension; ``reduced`` then sums it over the dimensions that replicate it as data (HSDP's
replicas; a tensor-parallel group computes its gradients whole: nothing to sum there) and
divides by the number of data replicas. Every placement is torch's own ``Shard``/``Replicate``
(no strided sharding), so checkpoints restore onto any mesh by their global offsets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._torch import collectives
from .._torch.modes import outside_dispatch_modes
from . import _ranks
from ._dtensors import is_dtensor
from ._layout import Roles


def of(mesh: Any, tp_plan: Any) -> Roles:
    """The roles of a 2-D ``mesh``: with a plan, (shard, tp); without, (replicate, shard)."""
    return Roles(shard=0, tp=1) if tp_plan is not None else Roles(replicate=0, shard=1)


def check(mesh: Any, world: int) -> None:
    """A 2-D mesh fxtrain can train on: named dimensions (the plan runs on a named one), and
    ranks laid out in order (``init_device_mesh``'s: rank r at ``divmod(r, columns)``), which
    is how ``fx.data`` splits the batch among the data replicas."""
    names = mesh.mesh_dim_names
    if not names:
        raise ValueError("fx.shard: a 2-D mesh needs dimension names; make it with "
                         "fx.sharding.mesh((rows, columns), ('dp', 'tp')) or "
                         "init_device_mesh(..., mesh_dim_names=(...))")
    with outside_dispatch_modes():  # mesh.mesh: tensor ops a simulated rank's fake mode fakes
        layout = mesh.mesh.tolist()
    if [r for row in layout for r in row] != list(range(world)):
        raise ValueError(f"fx.shard: the mesh lays the ranks out as {layout}; "
                         "fxtrain splits the batch by rank order, so it takes the ranks in "
                         "order, row by row (init_device_mesh's layout)")


def placements(p: torch.Tensor, roles: Roles, tp: Any = None) -> list:
    """The placements of ``p`` on a 2-D mesh of ``roles``, given its tensor-parallel placement
    ``tp`` (None: not planned). The shard dimension splits the first tensor dimension the plan
    does not (a 1-D tensor the plan splits, or a 0-d one, stays whole there)."""
    from torch.distributed.tensor import Replicate, Shard
    out: list = [Replicate(), Replicate()]
    if roles.tp is not None:
        out[roles.tp] = tp if tp is not None else Replicate()
    split = {tp.dim} if isinstance(tp, Shard) else set()
    free = [d for d in range(p.ndim) if d not in split]
    if free:
        out[roles.shard] = Shard(free[0])
    return out


def shard_dim(p: Any, roles: Roles) -> int | None:
    """The tensor dimension ``p`` is split along over the shard dimension (None: whole)."""
    from torch.distributed.tensor import Shard
    placement = p.placements[roles.shard]
    return placement.dim if isinstance(placement, Shard) else None


def value(p: Any, roles: Roles, planned: bool, dtype: torch.dtype | None = None) -> Any:
    """What the forward computes with, from the 2-D DTensor ``p`` (differentiably): its shard
    gathered over the shard dimension (in ``dtype``, None: its own), then, ``planned``, the
    DTensor on the tensor-parallel dimension the plan's layer takes, else the tensor."""
    mesh = p.device_mesh
    local = p.to_local()
    if dtype is not None:
        local = local.to(dtype)
    dim = shard_dim(p, roles)
    if dim is not None:
        n = mesh.size(roles.shard)
        rows = -(-p.shape[dim] // n)
        moved = local.movedim(dim, 0)
        if moved.shape[0] < rows:  # Shard splits as torch.chunk: the last ranks may hold fewer
            moved = nn.functional.pad(moved, (*([0, 0] * (moved.ndim - 1)), 0,
                                               rows - moved.shape[0]))
        whole = collectives.wait_tensor(collectives.all_gather_single(
            moved.contiguous(), 0, mesh.get_group(roles.shard)))
        local = whole[:p.shape[dim]].movedim(0, dim)
    return computed(local, p, roles, planned)


def computed(local: torch.Tensor, p: Any, roles: Roles, planned: bool) -> Any:
    """What the forward computes with, from ``local``: the 2-D DTensor ``p``'s own shard
    gathered whole over the shard dimension. ``planned``: the DTensor on the tensor-parallel
    dimension the plan's layer takes (differentiably), else ``local``."""
    from torch.distributed.tensor import DTensor
    if not planned:
        return local
    mesh = p.device_mesh
    tp_mesh = mesh[mesh.mesh_dim_names[roles.tp]]
    return DTensor.from_local(local, tp_mesh, [p.placements[roles.tp]], run_check=False,
                              shape=p.shape, stride=p.stride())


def shard_mesh(mesh: Any, roles: Roles) -> Any:
    """The 1-D mesh of ``mesh``'s shard dimension (this rank's group along it)."""
    return mesh[mesh.mesh_dim_names[roles.shard]]


def reduced(grad: Any, roles: Roles) -> Any:
    """The gradient of a 2-D parameter (a DTensor in its placements, summed over the shard
    dimension by the gather's backward) averaged over the data replicas: summed over each data
    dimension that replicates it, divided by their count."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh = grad.device_mesh
    local = grad.to_local()
    for d in roles.data:
        if isinstance(grad.placements[d], Replicate):
            local = collectives.all_reduce(local, "sum", mesh.get_group(d))
    replicas = 1
    for d in roles.data:
        replicas *= mesh.size(d)
    return DTensor.from_local(local / replicas, mesh, grad.placements, run_check=False,
                              shape=grad.shape, stride=grad.stride())


def counted(t: Any) -> bool:
    """Whether this rank counts ``t``'s local values in a sum over every rank (a norm): each
    value once, so a copy along a replicating dimension is counted at its coordinate 0 only
    (a tensor that is no DTensor: on rank 0)."""
    from torch.distributed.tensor import Replicate
    if not is_dtensor(t):
        return _ranks.rank() == 0
    where = t.device_mesh.get_coordinate()
    return all(where[d] == 0 for d, p in enumerate(t.placements) if isinstance(p, Replicate))
