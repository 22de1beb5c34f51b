"""The collectives of a sharded step: the parameters gathered for the forward, the gradients
reduce-scattered onto the shards, the norms' parts summed over the ranks (see
``fxtrain.distributed._shard`` for the layouts, ``fxtrain.distributed._strategies`` for the step's
use of them)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._torch import collectives
from . import _meshes, _units
from ._dtensors import gathered, is_dtensor, is_sharded
from ._layout import Layout
from ._tensor_parallel import planned_params


def for_forward(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """``params`` as the forward of a state of ``layout`` takes them: the DTensors outside its
    units gathered whole (differentiably: their gradients come back reduce-scattered onto the
    shards), those of its units left for the units to gather (``fxtrain.distributed._units``)."""
    if not is_sharded(params):
        return params
    root = _units.outside(params, layout.units)
    if layout.two_dimensional:  # the data dimension's shards gathered, the plan's DTensors
        planned = planned_params(layout.planned, root)
        return {**params, **{k: _meshes.value(params[k], layout.roles, k in planned)
                             for k in root}}
    if layout.tensor_parallel:
        return params  # tensor parallel: the planned layers take their DTensors as they are
    return {**params, **gather_params({k: params[k] for k in root})}


def frozen_for_forward(buffers: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """``buffers`` as the forward takes them: the frozen parameters among them that ``fx.shard``
    sharded (``Layout.frozen``) laid out as ``for_forward`` lays out parameters, without a
    gradient (nothing flows back to them); those of the units left for the units."""
    frozen = {k: buffers[k] for k in layout.frozen if k in buffers and is_dtensor(buffers[k])}
    if not frozen:
        return buffers
    with torch.no_grad():
        return {**buffers, **for_forward(frozen, layout)}



def with_whole_params(state: Any) -> Any:
    """``state`` with its parameters gathered whole once, on the model as it was before
    ``fx.shard`` prepared it (no units, no plan: the layout's ``whole()``), for a loop over
    batches whose count may differ between ranks (evaluation, prediction): a gather per batch
    would then be a collective that some ranks never reach."""
    if not is_sharded(state.params):
        return state
    layout = state.layout
    buffers = state.buffers if state.buffers is None else gathered(state.buffers)
    return state.replace(params=gathered(state.params), buffers=buffers, layout=layout.whole(),
                         module=state.module if layout.skeleton is None else layout.skeleton)


def _rows(p: Any, world: int) -> tuple[int, int, tuple[int, ...]]:
    """Rows of each rank's shard of ``p`` padded to the same size (``Shard(0)`` splits as
    ``torch.chunk`` does: the last ranks may hold fewer rows, or none), its elements, and the
    shape of one row."""
    rows = -(-p.shape[0] // world)
    inner = tuple(p.shape[1:])
    return rows, rows * math.prod(inner), inner


def _by_dtype(params: dict[str, Any]) -> dict[tuple, list[str]]:
    """The names of the parameters sharded ``Shard(0)`` on a 1-D mesh, by (mesh, dtype): each
    group moves in one collective. Others (your own placements) are left to DTensor."""
    from torch.distributed.tensor import Shard
    groups: dict[tuple, list[str]] = {}
    for k, p in params.items():
        if is_dtensor(p) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),) \
                and p.ndim >= 1 and p.shape[0] > 0:
            groups.setdefault((p.device_mesh, p.dtype), []).append(k)
    return groups


def gather_params(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole parameters, for the forward and backward inside a step: the ``Shard(0)``
    DTensors of each dtype in one all-gather (each shard padded to the same rows, as FSDP
    does), replicated ones as they are, any other DTensor by ``full_tensor``."""
    groups = _by_dtype(params)
    grouped = {k for names in groups.values() for k in names}
    out = {k: p if k in grouped else _units.gather(p) for k, p in params.items()}
    for (mesh, _), names in groups.items():
        world = mesh.size()
        pieces = []
        for k in names:
            local = params[k].to_local().reshape(-1)
            _, size, _ = _rows(params[k], world)
            pieces.append(torch.nn.functional.pad(local, (0, size - local.numel())))
        flat = collectives.all_gather_single(torch.cat(pieces), 0, mesh).view(world, -1)
        at = 0
        for k in names:
            rows, size, inner = _rows(params[k], world)
            out[k] = flat[:, at:at + size].reshape(world * rows, *inner)[:params[k].shape[0]]
            at += size
    return out


def reduce_scatter_grads(grads: dict[str, torch.Tensor], params: dict[str, Any],
                         roles: Any = None) -> dict:
    """Each rank's gradients, averaged over the ranks onto ``params``' shards.

    A whole gradient (taken with respect to gathered parameters): the ``Shard(0)`` ones of each
    dtype in one reduce-scatter; a replicated DTensor's is left whole (the step averages it
    with the loss); any other DTensor's by DTensor's own redistribution of ``Partial("avg")``.
    A gradient that is a DTensor already (taken with respect to the shards, through the
    forward's gathers, whose backward reduce-scattered it: ``fxtrain.distributed._units``) holds the sum
    over the ranks, and is divided by their number; on a 2-D mesh of ``roles``, averaged over
    the data replicas (``fxtrain.distributed._meshes.reduced``)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    done = [k for k, g in grads.items() if is_dtensor(g)]  # in order: the same on every rank
    average = _divided_by_ranks if roles is None else (lambda g: _meshes.reduced(g, roles))
    out, averaged = dict(grads), {}  # one gradient under two names is averaged once
    for k in done:
        g = grads[k]
        if id(g) not in averaged:
            averaged[id(g)] = average(g)
        out[k] = averaged[id(g)]
    params = {k: p for k, p in params.items() if k not in done}
    groups = _by_dtype(params)
    grouped = {k for names in groups.values() for k in names}
    for k, p in params.items():
        if is_dtensor(p) and k not in grouped and not all(
                isinstance(x, Replicate) for x in p.placements):
            partial = DTensor.from_local(grads[k], p.device_mesh, [Partial("avg")],
                                         run_check=False)
            out[k] = partial.redistribute(p.device_mesh, p.placements)
    for (mesh, _), names in groups.items():
        world, rank = mesh.size(), mesh.get_local_rank()
        columns = []  # row r: what rank r's shards receive
        for k in names:
            _, size, _ = _rows(params[k], world)
            g = grads[k].reshape(-1)
            columns.append(torch.nn.functional.pad(g, (0, world * size - g.numel()))
                           .view(world, size))
        mine = collectives.reduce_scatter_single(torch.cat(columns, 1).reshape(-1), "sum", 0,
                                                 mesh) / world
        at = 0
        for k in names:
            p = params[k]
            rows, size, inner = _rows(p, world)
            held = max(0, min(p.shape[0], (rank + 1) * rows) - rank * rows)
            local = mine[at:at + size].reshape(rows, *inner)[:held]
            out[k] = DTensor.from_local(local, mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
            at += size
    return out


def _divided_by_ranks(g: Any) -> Any:
    """``g / g.device_mesh.size()``: eager, on its local shard and in place (``g``, a sum the
    backward reduce-scattered, is the step's own), not through DTensor's dispatch; the same
    division, so the same bits."""
    if torch.compiler.is_compiling() or g.requires_grad:
        return g / g.device_mesh.size()
    with torch.no_grad():
        g.to_local().div_(g.device_mesh.size())
    return g


def local_parts(grads: dict[str, Any], finite: bool = False) -> list[torch.Tensor]:
    """This rank's part of each gradient's sum of squares, as plain float32 0-d tensors whose
    sum over the ranks is the whole gradient's (a shard's own; a copy counted once:
    ``fxtrain.distributed._meshes.counted``), and with ``finite`` also this rank's count of non-finite values
    (summed: zero when every gradient is finite)."""
    locals_ = [g.to_local() if is_dtensor(g) else g for g in grads.values()]
    mine = [_meshes.counted(g) for g in grads.values()]
    squared = [t.to(torch.promote_types(t.dtype, torch.float32)).square().sum() for t in locals_]
    parts = [sq if m else torch.zeros_like(sq) for sq, m in zip(squared, mine)]
    if finite:
        bad = [(~torch.isfinite(t)).sum() for t, m in zip(locals_, mine) if m]
        parts.append(torch.stack(bad).sum().float() if bad else locals_[0].new_zeros(()))
    return parts


def replicated_like(grads: dict[str, torch.Tensor], params: dict[str, Any]) -> dict:
    """``grads`` with the whole gradient of each replicated DTensor parameter made a
    replicated DTensor like it (after the step has averaged it over the ranks)."""
    from torch.distributed.tensor import DTensor
    return {k: DTensor.from_local(g, params[k].device_mesh, params[k].placements,
                                  run_check=False)
            if is_dtensor(params[k]) and not is_dtensor(g) else g for k, g in grads.items()}


def local_nbytes(tree: Any) -> int:
    """The bytes of ``tree``'s tensors held by this rank (a DTensor's local shard only).

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(4, 2), fx.optim.adam(1e-3))
        >>> fx.sharding.local_nbytes(state.params)  # 2x4 + 2 float32 values, unsharded
        40
    """
    return sum((leaf.to_local() if is_dtensor(leaf) else leaf).nbytes
               for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))
