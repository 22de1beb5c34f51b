"""What a DTensor is, and its whole value: the few facts about sharded tensors that the tree
utilities, the state and the export need (``fxtrain.sharding`` makes and moves the shards)."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.utils._pytree as pytree


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing the module)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def is_sharded(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a DTensor (a state made by ``fx.shard``). A dict's
    tensors are read without torch's pytree, in a plain loop: Dynamo traces the pytree walk,
    a generator and a call per leaf in Python (a step asks this of its parameters: 0.6 CPU-s
    of a 24-layer GPT-2's trace that way)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    if not isinstance(tree, dict):
        return any(isinstance(leaf, module.DTensor) for leaf in pytree.tree_leaves(tree))
    for value in tree.values():
        if isinstance(value, module.DTensor) or (
                not isinstance(value, torch.Tensor) and is_sharded(value)):
            return True
    return False


def gather_tensor(t: Any) -> Any:
    """The whole tensor of a DTensor (all-gathered: a collective), anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def gathered(tree: Any) -> Any:
    """``tree`` with its DTensors gathered whole (a collective: every rank calls it)."""
    if not is_sharded(tree):
        return tree
    return pytree.tree_map(gather_tensor, tree)


def distributed(t: torch.Tensor, mesh: Any, placements: Any) -> Any:
    """``distribute_tensor(t, mesh, placements)``: rank 0's values scattered; a meta tensor
    (a skeleton's, ``fx.from_pretrained``'s) only split here, nothing to send, so each rank's
    meta DTensor has its own local shape."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t, mesh, placements, src_data_rank=None if t.is_meta else 0)
