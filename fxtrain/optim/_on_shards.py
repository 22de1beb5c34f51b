"""An elementwise optimizer's eager update of a sharded state, run on each rank's local shards.

Each op on a DTensor goes through DTensor's Python dispatch (its sharding propagation) before
the local op runs: an eager AdamW update of a 4-block GPT-2 made some 800 such dispatches a
step, most of the update's time (``benchmarks/fsdp2.py``). A transformation that treats each
leaf alone (``ElementwiseTransformation``) computes the same thing on the local shards, when
each parameter's gradient is laid out as the parameter is: the same ATen ops on the same local
tensors, so the same bits, and the results are wrapped back with the layouts they came with.
Compiled, Dynamo traces the DTensor ops into plain ones, so this path is eager only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..distributed import is_dtensor, is_sharded
from .base import ElementwiseTransformation, GradientTransformation, InPlace, _local, \
    update_weighted, writable


def _same_layout(a: Any, b: Any) -> bool:
    return (a.device_mesh == b.device_mesh and a.placements == b.placements
            and a.shape == b.shape)


def _laid_out_alike(grads: Any, params: Any) -> bool:
    """Whether each gradient is a DTensor exactly where its parameter is, laid out alike."""
    if not isinstance(params, dict) or not isinstance(grads, dict) or grads.keys() != params.keys():
        return False
    for k, p in params.items():
        g = grads[k]
        if is_dtensor(p) != is_dtensor(g) or (is_dtensor(p) and not _same_layout(p, g)):
            return False
    return True


def _wrapped(new: Any, like: Any, local: Any) -> Any:
    """``new``, a local result, as a DTensor laid out as ``like`` (``like`` itself when the
    update wrote into ``local``, its local tensor)."""
    if not is_dtensor(like):
        return new
    if new is local:
        return like
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(new, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _any_requires_grad(*trees: Any) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad
               for tree in trees for x in pytree.tree_leaves(tree))


def on_shards(tx: GradientTransformation, grads: Any, opt_state: Any, params: Any,
              in_place: InPlace | None = None) -> tuple[Any, Any] | None:
    """``tx.update(grads, opt_state, params)`` on the local shards, wrapped back: for an eager
    step (the caller's to tell: compiled, Dynamo traces DTensor's ops into plain ones) of an
    ``ElementwiseTransformation`` on a sharded state whose gradients are laid out as their
    parameters; None where that does not hold (the caller updates through DTensor).
    ``in_place``: the caller gives ``opt_state`` up (``InPlace``), so the local state is too."""
    if (not isinstance(tx, ElementwiseTransformation)
            or not is_sharded(params) or not _laid_out_alike(grads, params)
            or _any_requires_grad(grads, opt_state, params)):  # an update differentiated
        return None

    def update(local_state):
        into = InPlace(local_state) if writable(opt_state, in_place) else None
        updates, new_state = update_weighted(
            tx, {k: _local(g) for k, g in grads.items()}, local_state,
            {k: _local(p) for k, p in params.items()}, None, in_place=into)
        # the local updates rewrapped as their parameters
        return {k: _wrapped(u, params[k], None) for k, u in updates.items()}, new_state

    return locally(opt_state, update, "an ElementwiseTransformation",
                   "make the transformation a plain GradientTransformation")


def locally(opt_state: Any, update: Callable[[Any], tuple[Any, Any] | None], what: str,
            remedy: str = "") -> tuple[Any, Any] | None:
    """``update(local_state) -> (result, new_local_state)`` (or None) run on the local tensors
    of ``opt_state``'s leaves, without autograd (to_local and from_local without their autograd
    functions: ``update`` wraps its own result there too): ``(result, new_state)``, each new
    leaf rewrapped with the layout of the old one in its place (the old one itself where the
    update wrote into its local tensor). ``what`` and ``remedy`` word the error raised where the
    update changed the state's structure."""
    old_leaves, spec = pytree.tree_flatten(opt_state)
    with torch.no_grad():
        local_leaves = [_local(x) for x in old_leaves]
        out = update(pytree.tree_unflatten(local_leaves, spec))
        if out is None:
            return None
        result, new_state = out
        new_leaves, new_spec = pytree.tree_flatten(new_state)
        if new_spec != spec:
            raise RuntimeError(f"{what}'s state changed its structure in an update (from {spec} "
                               f"to {new_spec})" + (f"; {remedy}" if remedy else ""))
        return result, pytree.tree_unflatten(
            [_wrapped(n, o, lo) for n, o, lo in zip(new_leaves, old_leaves, local_leaves)],
            new_spec)
