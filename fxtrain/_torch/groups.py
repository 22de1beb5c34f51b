"""A ``DeviceMesh``'s hold on its process groups, let go at exit; DTensor's caches of meshes,
emptied when the process group they were made in is gone.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. ``DeviceMesh._pg_registry`` is private; no
public call makes a mesh drop its groups (``destroy_process_group`` leaves the mesh's
references). A mesh without the attribute (an older or newer torch) is left as it is: its
groups are then destroyed when the mesh is, possibly at the interpreter's finalization.

DTensor's sharding propagation caches (one in C++, ``torch._C``'s, one in Python) and its
redistribute planner's are private too, and no public call empties them. A cache a torch
lacks is skipped.
"""

from __future__ import annotations

from typing import Any

import torch


def forget_groups(mesh: Any) -> None:
    """Drops ``mesh``'s own references to its process groups, so that a group that nothing else
    holds (after ``destroy_process_group``) is destroyed now rather than with the mesh."""
    getattr(mesh, "_pg_registry", {}).clear()


def forget_sharding_caches() -> None:
    """Empties DTensor's caches of sharding decisions. They are keyed by the specs' meshes,
    which compare by shape, names and device, not by process group: after
    ``destroy_process_group`` and a new group, an op on the new mesh's DTensors was given
    output specs holding the old mesh, and a traced step asking it its rank failed ("Group ...
    is not registered")."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import _redistribute
    clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear is not None:
        clear()
    propagator = DTensor._op_dispatcher.sharding_propagator
    for cached in (getattr(propagator, "propagate_op_sharding", None),
                   getattr(propagator, "_propagate_tensor_meta_cached", None),
                   getattr(_redistribute, "_gen_transform_infos", None)):
        getattr(cached, "cache_clear", lambda: None)()
    getattr(_redistribute, "clear_redistribute_planner_cache", lambda: None)()
