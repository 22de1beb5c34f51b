"""Functional collectives: the traceable all-gather, reduce-scatter and all-reduce of a sharded
or data-parallel step, and ``fxtrain::all_gather_shard``, a gather whose backward
reduce-scatters in another dtype.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. ``torch.distributed._functional_collectives``
and the ``torch.ops._c10d_functional`` ops are private, and have no public counterpart: the
public ``torch.distributed`` collectives write into tensors they are given, where these return
new ones, which a compiled step's graph holds as any other op (Inductor may bucket and reorder
them) and which, eagerly, wait for their collective only when first read. Torch's
``all_gather_single`` and ``reduce_scatter_single`` are named so from 2.13 on (their old names,
``all_gather_tensor`` and ``reduce_scatter_tensor``, warn there); torch 2.11 has only the old
names, which this module's functions call there. Importing this module imports none of it: a
step's first collective does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def _funcol() -> Any:
    import torch.distributed._functional_collectives as funcol
    return funcol


def all_gather_single(tensor: torch.Tensor, gather_dim: int, group: Any) -> torch.Tensor:
    """``tensor`` of every rank of ``group`` (a mesh, a process group) concatenated along
    ``gather_dim``; eagerly, a tensor that waits for the gather when it is first read."""
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # < 2.13
    return gather(tensor, gather_dim, group)


def all_gather_autograd(tensor: torch.Tensor, gather_dim: int, group: Any) -> torch.Tensor:
    """``all_gather_single`` inside the autograd graph: the gradient of the result is
    reduce-scattered (summed) back, each rank receiving its own slice's."""
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single_autograd", None) \
        or funcol.all_gather_tensor_autograd  # < 2.13
    return gather(tensor.contiguous(), gather_dim, group)


def all_gather_into(output: torch.Tensor, mine: torch.Tensor, group: Any) -> Any:
    """Starts the all-gather of ``mine`` into ``output`` (rank by rank along dim 0) over the
    process group ``group``, returning its work to wait on (eager: c10d's own collective,
    which fills ``output`` in place, so ``mine`` may be a view of it). Torch 2.13 renamed
    ``all_gather_into_tensor`` ``all_gather_single`` (the old name warns there)."""
    import torch.distributed as dist
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, mine, group=group, async_op=True)


def reduce_scatter_single(tensor: torch.Tensor, op: str, scatter_dim: int,
                          group: Any) -> torch.Tensor:
    """This rank's part (along ``scatter_dim``) of ``tensor`` reduced (``op``: "sum", "avg"...)
    over the ranks of ``group``."""
    funcol = _funcol()
    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    return scatter(tensor, op, scatter_dim, group)


def all_reduce(tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    """``tensor`` reduced (``op``) over the ranks of ``group``, on every rank."""
    return _funcol().all_reduce(tensor, op, group)


def reduce_scattered(tensor: torch.Tensor, group_size: int, group: str) -> torch.Tensor:
    """This rank's part (dim 0) of ``tensor`` summed over the ``group_size`` ranks of the
    process group named ``group``, waited for."""
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(tensor, "sum", group_size, group))


def wait_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a collective's output) once its collective has finished."""
    return _funcol().wait_tensor(tensor)


@torch.library.custom_op("fxtrain::all_gather_shard", mutates_args=())
def all_gather_shard(local: torch.Tensor, group_size: int, group: str,
                     reduce_dtype: torch.dtype) -> torch.Tensor:
    """All-gathers ``local`` (dim 0) over the ``group_size`` ranks of the process group named
    ``group``; its backward reduce-scatters (sums) the gradient in ``reduce_dtype`` and hands
    it back in ``local``'s dtype: FSDP2's reduce dtype, which a gather's own backward (in the
    gathered dtype) cannot give."""
    del reduce_dtype  # the backward's
    return _gathered_and_waited(local, group_size, group)


def _gathered_and_waited(local: torch.Tensor, group_size: int, group: str,
                         *_: Any) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_gather_into_tensor(local, group_size, group))


@all_gather_shard.register_fake
def _(local, group_size, group, reduce_dtype):
    del group, reduce_dtype
    return local.new_empty((local.shape[0] * group_size, *local.shape[1:]))


def _all_gather_shard_backward(ctx, grad):
    c10d = torch.ops._c10d_functional
    summed = c10d.wait_tensor(c10d.reduce_scatter_tensor(
        grad.to(ctx.reduce_dtype).contiguous(), "sum", ctx.group_size, ctx.group))
    return summed.to(ctx.dtype), None, None, None


def _all_gather_shard_context(ctx, inputs, output):
    del output
    local, ctx.group_size, ctx.group, ctx.reduce_dtype = inputs
    ctx.dtype = local.dtype


all_gather_shard.register_autograd(_all_gather_shard_backward,
                                   setup_context=_all_gather_shard_context)

# What a traced step records of the op (below autograd, which keeps the backward above): the
# functional all-gather and its wait themselves. As one opaque op, Inductor did not count it
# among the collectives whose order it keeps from the program, and placed it by the ranks'
# shard sizes: on 2 ranks with shards of 9 and 8 rows, rank 0 ran a unit's recomputed gather
# after a reduce-scatter that rank 1 ran after it, and both waited forever.
_DECOMPOSED = torch.library.Library("fxtrain", "FRAGMENT")
_DECOMPOSED.impl("all_gather_shard", _gathered_and_waited, "CompositeImplicitAutograd")


@functools.cache
def gather_ops() -> frozenset:
    """The ops a traced gather of a sharded parameter runs (``all_gather_shard``'s or the
    functional all-gather, its wait, the wrapper that ties the wait to autograd) and those that
    lay its output out (the pad of the last rank's short shard, a dtype cast): what a unit's
    checkpointed region recomputes in the backward (``fxtrain.distributed._units``)."""
    c10d, aten = torch.ops._c10d_functional, torch.ops.aten
    return frozenset((c10d.all_gather_into_tensor.default, c10d.wait_tensor.default,
                      c10d._wrap_tensor_autograd.default, aten.constant_pad_nd.default,
                      aten._to_copy.default, torch.ops.fxtrain.all_gather_shard.default))


def casts_to_float8(op: Any, kwargs: dict) -> bool:
    """Whether ``op`` called with ``kwargs`` is a cast to float8 (a float8 weight's shard
    before its all-gather, ``fxtrain.distributed._float8_gather``: what a unit's checkpointed
    region keeps, its gather recomputed from it)."""
    return op is torch.ops.aten._to_copy.default and kwargs.get("dtype") in (
        torch.float8_e4m3fn, torch.float8_e5m2)
