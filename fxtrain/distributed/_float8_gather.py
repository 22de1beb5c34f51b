"""Float8 all-gather of a unit's float8 weights: torchao's ``enable_fsdp_float8_all_gather`` on
fx.shard's own gathers.

A model converted by ``fx.precision.float8(enable_fsdp_float8_all_gather=True)`` keeps the
option in its float8 layers' configs (``fxtrain._torch.float8.float8_gathered``). An eager
per-block unit (``fxtrain.distributed._unit_gather``) then gathers those layers' weights apart
from its other parameters, as torchao's FSDP2 hooks do (``fsdp_pre_all_gather`` with
``reduce_amax``): each rank takes its shard's absolute maximum, one all-reduce (max) over the
shard group gives every weight's amax, each rank casts its shard with the scale of that amax
(tensorwise: the scale the whole weight's cast would take) to float8, and one all-gather moves
the bits (as ``uint8``: a quarter of float32's bytes). The gathered weight is torchao's float8
tensor, bits and scale, which the layer's product takes as it is (torchao's
``tensor_already_casted_to_fp8``). A cast is element by element, so the bits are those of the
whole weight cast in one piece: the same products as without the option. Its gradient, in the
high precision, is reduce-scattered onto the shard as any parameter's (the cast passes it
through, as torchao's does).

Unlike the unit's other parameters, the gathered float8 weights are kept from the forward for
the backward (a quarter of their float32 bytes, per unit; FSDP2 gathers them again).

A compiled step's unit gathers the same way through functional collectives (``traced``), in
the step's one graph, inside the unit's checkpointed region: the region keeps each float8 shard
and recomputes its all-gather for the backward. The gradient's way back is a Function apart
(``fxtrain._torch.float8.ScatteredBack``, in the graph as a call) whose output holds no data.
"""

from __future__ import annotations

from typing import Any

import torch

from .._torch import collectives
from . import _unit_buffer


def gathered(plan: _unit_buffer.Plan, layers: list[Any],
             shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole weights of this rank's ``shards`` as float8 tensors, each cast as its layer in
    ``layers`` casts its weight, with one scale over the ranks: one all-reduce of the amaxes,
    one all-gather of the bits."""
    from .._torch import float8 as fence
    group = plan.mesh.get_group()
    amax = torch.stack([s.abs().max() if s.numel() else s.new_zeros(()) for s in shards])
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    scales = [fence.weight_scale(a, layer.config) for a, layer in zip(amax, layers)]
    sizes = plan.sizes()
    flat = torch.empty((plan.world, sum(sizes)), dtype=torch.uint8, device=shards[0].device)
    mine = flat[plan.mesh.get_local_rank()]
    torch.cat([_unit_buffer.padded(fence.weight_bits(s, scale, layer.config).view(torch.uint8)
                                   .reshape(-1), n)
               for s, scale, layer, n in zip(shards, scales, layers, sizes)], out=mine)
    bits = plan.copied_out(_unit_buffer.Issued(flat, collectives.all_gather_into(
        flat.view(-1), mine, group)))
    dtype = plan.dtype or shards[0].dtype
    return [fence.from_bits(b.view(layer.config.cast_config_weight.target_dtype), scale, dtype,
                            layer.linear_mm_config)
            for b, scale, layer in zip(bits, scales, layers)]


class Gather(torch.autograd.Function):
    """Weight shards in, whole float8 weights out (``gathered``); the backward reduce-scatters
    their high-precision gradients onto the shards."""

    @staticmethod
    def forward(ctx: Any, plan: _unit_buffer.Plan, layers: list[Any],
                *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.like = plan, [(s.shape[0], s.dtype) for s in shards]
        ctx.set_materialize_grads(False)
        return tuple(gathered(plan, layers, list(shards)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        return (None, None, *ctx.plan.scattered(grads, ctx.like))


def gathered_weights(params: list[Any], layers: list[Any], gather: Any) -> list[torch.Tensor]:
    """The whole float8 weights of the DTensors ``params`` (``Shard(0)`` on a 1-D mesh), each
    of its float8 layer in ``layers``, differentiable (``Gather``); in ``gather.param_dtype``
    where the unit computes in it."""
    return list(Gather.apply(_unit_buffer.plan_of(params, gather), layers,
                             *(p.to_local() for p in params)))


def traced(p: Any, layer: Any, gather: Any) -> torch.Tensor:
    """The whole weight of the DTensor ``p`` (``Shard(0)`` on a 1-D mesh) of the float8 layer
    ``layer``, as a float8 tensor, through functional collectives: what a unit of a compiled
    step gathers (``fxtrain.distributed._units``, inside its checkpointed region, which saves
    the float8 shard and recomputes its all-gather in the backward). The absolute maximum of
    the shard, one all-reduce (max) over the mesh, the scale of that amax, the shard cast to
    float8 and all-gathered as ``uint8``: the bits and scale of the whole weight cast in one
    piece (``_bits``). Its gradient, in the high precision, is reduce-scattered onto the shard
    in ``gather.reduce_dtype`` (None: ``param_dtype``'s; ``fxtrain._torch.float8.ScatteredBack``).
    It stands for ``gather.param_dtype`` where the unit computes in it."""
    from .._torch import float8 as fence
    dtype, mesh, rows = gather.param_dtype or p.dtype, p.device_mesh, p.shape[0]
    shard = p.to_local()
    bits, scale = _bits(shard.detach(), rows, mesh, layer.config)
    way_back = fence.ScatteredBack.apply(shard, rows, _per_rank(rows, mesh) * mesh.size(),
                                         mesh.size(), mesh.get_group().group_name, dtype,
                                         gather.reduce_dtype or dtype)
    return fence.with_gradient_to(way_back, bits, scale, layer.linear_mm_config)


def _bits(shard: torch.Tensor, rows: int, mesh: Any,
          config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The float8 bits of the whole weight (its ``rows``, of which ``shard`` is this rank's
    ``Shard(0)``) cast with the scale of its amax over ``mesh``, and that scale."""
    from .._torch import float8 as fence
    amax = shard.abs().max() if shard.numel() else shard.new_zeros(())
    amax = collectives.wait_tensor(collectives.all_reduce(amax, "max", mesh))
    scale = fence.weight_scale(amax, config)
    bits = fence.weight_bits(shard, scale, config).view(torch.uint8)
    short = _per_rank(rows, mesh) - shard.shape[0]  # Shard(0) splits as torch.chunk
    if short:
        bits = torch.nn.functional.pad(bits, (*([0, 0] * (bits.ndim - 1)), 0, short))
    whole = collectives.wait_tensor(collectives.all_gather_single(bits, 0, mesh))[:rows]
    return whole.view(config.cast_config_weight.target_dtype), scale


def _per_rank(rows: int, mesh: Any) -> int:
    """The rows each rank's shard is padded to (``Shard(0)``'s largest)."""
    return -(-rows // mesh.size())
