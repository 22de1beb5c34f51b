"""What a DTensor is, and its whole value: the few facts about sharded tensors that the tree
utilities, the state and the export need (``fxtrain.sharding`` makes and moves the shards)."""

from __future__ import annotations

import sys
from typing import Any

import torch.utils._pytree as pytree


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing the module)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def is_sharded(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a DTensor (a state made by ``fx.shard``)."""
    return "torch.distributed.tensor" in sys.modules and any(
        is_dtensor(leaf) for leaf in pytree.tree_leaves(tree))


def gather_tensor(t: Any) -> Any:
    """The whole tensor of a DTensor (all-gathered: a collective), anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def gathered(tree: Any) -> Any:
    """``tree`` with its DTensors gathered whole (a collective: every rank calls it)."""
    if not is_sharded(tree):
        return tree
    return pytree.tree_map(gather_tensor, tree)
