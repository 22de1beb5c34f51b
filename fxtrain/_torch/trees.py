"""Mapping a function over several pytrees at once while Dynamo traces, on torch 2.11.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0.

``torch.utils._pytree.tree_map(fn, tree, *rests)`` checks each node of ``rests`` against
``tree``'s with ``node_type != spec.type``. Torch 2.11's Dynamo traces that comparison of two
classes into the class's own ``__eq__`` (a dataclass's, which fxtrain's states are), called
unbound, and stops the trace ("failed to bind arguments when attempting to inline ...
__eq__"). ``map_several`` flattens each tree on its own instead and compares the structures
node by node, classes by identity; ``needed()`` while compiling on a torch before 2.13 (from 2.13
on torch's own ``tree_map`` traces).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .version import at_least


def needed() -> bool:
    """Whether ``map_several`` must stand in for torch's ``tree_map`` (see the module)."""
    return not at_least(2, 13) and torch.compiler.is_compiling()


def map_several(fn: Callable, tree: Any, *rests: Any) -> Any:
    """``pytree.tree_map(fn, tree, *rests)`` for trees of one structure."""
    leaves, spec = pytree.tree_flatten(tree)
    others = []
    for rest in rests:
        rest_leaves, rest_spec = pytree.tree_flatten(rest)
        if not _same(spec, rest_spec):
            raise ValueError(f"tree_map: the trees differ in structure: {spec} and {rest_spec}")
        others.append(rest_leaves)
    return pytree.tree_unflatten([fn(*xs) for xs in zip(leaves, *others)], spec)


def _same(a: Any, b: Any) -> bool:
    return (a.type is b.type and _equal(a.context, b.context)
            and len(a.children()) == len(b.children())
            and all(_same(x, y) for x, y in zip(a.children(), b.children())))


def _equal(a: Any, b: Any) -> bool:  # no `is` on other values: 2.11's Dynamo refuses it
    if isinstance(a, type) or isinstance(b, type):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b
