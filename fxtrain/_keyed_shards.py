"""Keyed draws on a DTensor: each rank draws its own block of the mask one process draws on the
whole tensor, so a dropout on activations split over the ranks (sequence parallelism: a norm's
or a residual's ``Shard(1)``) drops what it drops on one process, bit for bit.

A keyed mask is a hash of (key, element index) (``fxtrain.random``), so a block of it needs no
other rank's part: each rank hashes the indices its block holds in the whole mask. The block is
where the DTensor's placements put this rank's local tensor (``torch.chunk``'s split, mesh
dimension after mesh dimension, as torch lays out ``Shard``); ``Replicate`` keeps the whole, and
a ``Partial`` tensor (a sum not yet taken) is refused. A plain tensor is drawn whole: a rank
that holds a slice as a plain tensor (a style's ``use_local_output=True``) draws the mask of
its slice's shape, which is no block of one process's; keep such activations DTensors where
they are dropped (``SequenceParallel()`` on the dropout, its output a DTensor or, with
``use_local_output=True``, a plain tensor again after it).

Under context parallelism (``fx.shard(context=...)``) each rank holds a head and a tail chunk
of every sequence as a plain tensor: its dropout masks are drawn at its positions' indices in
one process's mask (``context_index``), the sequence taken to be dimension 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .distributed import is_dtensor


def _block(x, mask_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """This rank's block of a ``mask_shape`` mask over the DTensor ``x``: its shape and its
    offsets (a dimension the mask broadcasts over, size 1, is whole)."""
    from torch.distributed.tensor import Partial, Shard
    mesh, where = x.device_mesh, x.device_mesh.get_coordinate()
    sizes, offsets = list(mask_shape), [0] * len(mask_shape)
    for d, placement in enumerate(x.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"fxtrain: a keyed dropout on a DTensor whose placement is "
                             f"{placement} (a sum the ranks have not taken yet) would drop "
                             "parts of a sum; redistribute it to Shard or Replicate first")
        if isinstance(placement, Shard) and mask_shape[placement.dim % x.ndim] != 1:
            dim = placement.dim % x.ndim
            chunk = -(-sizes[dim] // mesh.size(d))
            begin = min(where[d] * chunk, sizes[dim])
            offsets[dim] += begin
            sizes[dim] = min(chunk, sizes[dim] - begin)
    return sizes, offsets


def block_index(x, mask_shape: Sequence[int]) -> torch.Tensor:
    """The row-major indices in the whole ``mask_shape`` of this rank's block (``_block``),
    shaped as the block."""
    sizes, offsets = _block(x, mask_shape)
    return _row_major(mask_shape, [torch.arange(o, o + n, dtype=torch.int64, device=x.device)
                                   for n, o in zip(sizes, offsets)], x.device)


def _row_major(whole: Sequence[int], along: Sequence[torch.Tensor],
               device: torch.device) -> torch.Tensor:
    """The row-major indices, in a tensor of shape ``whole``, of the elements at the indices
    ``along`` each dimension (a block of them, shaped as ``along``'s lengths)."""
    index = torch.zeros((), dtype=torch.int64, device=device)
    for extent, at in zip(whole, along):
        index = index[..., None] * extent + at
    return index


def context_index(mask_shape: Sequence[int], size: int, rank: int,
                  device: torch.device) -> torch.Tensor:
    """The row-major indices, in the mask of one process's whole sequences, of a
    context-parallel rank's ``mask_shape`` mask over ``(batch, its positions, ...)``: its
    positions (``fxtrain.distributed.context_slots``) along dimension 1, of ``size`` times
    the length."""
    from .distributed import context_slots as slots
    whole = [mask_shape[0], mask_shape[1] * size, *mask_shape[2:]]
    along = [slots(n, size, rank).to(device) if d == 1 else
             torch.arange(mask_shape[d], dtype=torch.int64, device=device)
             for d, n in enumerate(whole)]
    return _row_major(whole, along, device)


def on_block(x: torch.Tensor, mask_shape: Sequence[int],
             draw: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
             context: tuple[int, int] | None = None) -> torch.Tensor:
    """``draw(x, None)`` for a tensor; for a DTensor, ``draw`` on its local tensor with the
    indices of its block of the mask (``block_index``), the result a DTensor placed as ``x``.
    ``context``: ``(size, rank)`` of a context-parallel step, whose plain tensors of two
    dimensions or more hold the rank's positions of the sequence along dimension 1
    (transformers' ``(batch, length, ...)``): drawn with their indices in one process's mask
    (``context_index``), so each rank drops what one process drops there."""
    if not is_dtensor(x):
        if context is None or len(mask_shape) < 2 or mask_shape[1] == 1:
            return draw(x, None)
        return draw(x, context_index(mask_shape, *context, x.device))
    from torch.distributed.tensor import DTensor
    out = draw(x.to_local(), block_index(x, mask_shape))
    return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False,
                              shape=x.shape, stride=x.stride())
