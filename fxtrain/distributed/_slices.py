"""Which part of a whole tensor a rank holds under a DTensor's placements: the box of index
ranges this rank's local tensor is, so that a loader reads that part alone from a file.

``distribute_tensor`` splits a dimension as ``torch.chunk`` does (chunks of ``ceil(n / k)``,
the last ones short or empty: 37 rows over 4 ranks are 10, 10, 10 and 7; 5 over 4 are 2, 2, 1
and 0), the mesh's dimensions applied in order, each to what the previous ones left. A
``Replicate`` dimension keeps the whole range; ``Partial`` and strided shards hold no
contiguous part of the whole and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def local_box(shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
              placements: Sequence[Any]) -> tuple[slice, ...]:
    """The slices of a tensor of ``shape`` that the rank at ``coordinate`` of a mesh of
    ``mesh_shape`` holds under ``placements`` (one per mesh dimension)."""
    from torch.distributed.tensor import Replicate, Shard
    start, size = [0] * len(shape), list(shape)
    if not len(mesh_shape) == len(coordinate) == len(placements):
        raise ValueError(f"placements {tuple(placements)} for a mesh of shape "
                         f"{tuple(mesh_shape)}")
    for parts, index, placement in zip(mesh_shape, coordinate, placements, strict=True):
        if type(placement) is Shard:
            dim = placement.dim % len(shape) if shape else 0
            # torch's own split arithmetic (public since 2.11): (size, offset)
            size[dim], offset = Shard.local_shard_size_and_offset(size[dim], parts, index)
            start[dim] += offset
        elif not isinstance(placement, Replicate):
            raise ValueError(f"a {type(placement).__name__} placement ({placement}) holds no contiguous part of the whole "
                             "tensor: only Shard and Replicate placements can be read slice "
                             "by slice")
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def held_box(tensor: Any) -> tuple[slice, ...]:
    """The box of the whole tensor this rank holds of the DTensor ``tensor``."""
    mesh = tensor.device_mesh
    return local_box(tuple(tensor.shape), tuple(mesh.shape), tuple(mesh.get_coordinate()),
                     tensor.placements)
