"""Tree utilities: maps and selections over tensor leaves, norms, paths, structure checks and
the state digest. The floor every other module stands on: it imports only ``donation``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from ._torch import trees
from .donation import check_live
from .distributed import gathered

__all__ = ["tree_map", "tree_zeros_like", "tree_select", "global_norm", "leaves_with_paths",
           "check_same_structure", "tree_digest"]


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """``fn`` over the tensor leaves of ``tree`` (and the matching leaves of ``rest``).

    Other leaves (``None`` marks an absent state) pass through from ``tree`` unchanged. A flat
    dict of tensors (the parameter layout) takes a direct path: fewer guards when compiled.

    Examples:
        >>> params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
        >>> fx.tree.tree_map(lambda p: 2 * p, params)
        {'w': tensor([2., 4.]), 'b': tensor([1.])}
        >>> fx.tree.tree_map(lambda p, g: p - 0.1 * g, params, params)  # leaves side by side
        {'w': tensor([0.9000, 1.8000]), 'b': tensor([0.4500])}
        >>> fx.tree.tree_map(torch.neg, (torch.ones(1), None))  # None passes through
        (tensor([-1.]), None)
    """
    if type(tree) is dict and all(type(r) is dict and r.keys() == tree.keys() for r in rest):
        # written out for one and two trees: Dynamo traces every call inline, per leaf
        if not rest:
            return {k: fn(v) if isinstance(v, torch.Tensor) else tree_map(fn, v)
                    for k, v in tree.items()}
        if len(rest) == 1:
            other = rest[0]
            return {k: fn(v, other[k]) if isinstance(v, torch.Tensor)
                    else tree_map(fn, v, other[k]) for k, v in tree.items()}
        return {k: _apply(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    mapped = (lambda x, *xs: fn(x, *xs) if isinstance(x, torch.Tensor) else x)
    if rest and trees.needed():  # torch 2.11's Dynamo cannot trace torch's (fxtrain._torch.trees)
        return trees.map_several(mapped, tree, *rest)
    return pytree.tree_map(mapped, tree, *rest)


def _apply(fn: Callable, x: Any, *xs: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x, *xs)
    return tree_map(fn, x, *xs)


def tree_zeros_like(tree: Any) -> Any:
    """``tree`` with every tensor leaf replaced by zeros of its shape and dtype.

    Examples:
        >>> fx.tree.tree_zeros_like({"w": torch.ones(2, dtype=torch.float64), "n": None})
        {'w': tensor([0., 0.], dtype=torch.float64), 'n': None}
    """
    return tree_map(torch.zeros_like, tree)


def tree_select(pred: torch.Tensor, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``torch.where(pred, a, b)``: a branch-free choice between two trees (a leaf
    that is the same tensor in both is kept as it is).

    Examples:
        >>> new, old = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 0.0])}
        >>> fx.tree.tree_select(torch.tensor(True), new, old)
        {'w': tensor([1., 2.])}
        >>> fx.tree.tree_select(torch.tensor(False), new, old)  # no branch, no host sync
        {'w': tensor([0., 0.])}
    """
    return tree_map(lambda a, b: a if a is b else torch.where(pred, a, b), on_true, on_false)


def first_leaf(tree: Any) -> torch.Tensor:
    """The first leaf of ``tree`` (where a transform reads the device and dtype of its state)."""
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        raise ValueError("the parameter tree has no tensors")
    return leaves[0]


def global_norm(tree: Any) -> torch.Tensor:
    """sqrt(sum of squares of every leaf), accumulated in float32 or wider.

    Examples:
        >>> fx.tree.global_norm({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])})
        tensor(5.)
        >>> fx.tree.global_norm([torch.full((2,), 300.0, dtype=torch.float16)])  # 300**2 > fp16 max
        tensor(424.2641)
    """
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        raise ValueError("global_norm of an empty tree")
    return torch.sqrt(sum(squared_norms(leaves)))


def squared_norms(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each leaf's sum of squares in float32 or wider (plain reductions that Inductor fuses)."""
    return [leaf.to(torch.promote_types(leaf.dtype, torch.float32)).square().sum() for leaf in leaves]


def path_str(path: tuple) -> str:
    """A key path as text, like ``.params['w']`` (``<root>`` for the root)."""
    return "".join(str(k) for k in path) or "<root>"


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in torch pytree order, paths like ``.params['w']``.

    Examples:
        >>> fx.tree.leaves_with_paths({"params": {"w": torch.zeros(2)}, "step": torch.tensor(3)})
        [("['params']['w']", tensor([0., 0.])), ("['step']", tensor(3))]
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> for path, leaf in fx.tree.leaves_with_paths(state):  # None: a field left empty
        ...     print(path, None if leaf is None else tuple(leaf.shape))
        .step ()
        .params['weight'] (1, 2)
        .params['bias'] (1,)
        .buffers None
        .opt_state[0].count ()
        .opt_state[0].learning_rate ()
        .rng ()
        .data None
        .callbacks None
    """
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [(path_str(path), leaf) for path, leaf in flat]


def _describe_mismatch(expected: Any, got: Any) -> str:
    want = {p: leaf for p, leaf in leaves_with_paths(expected)}
    have = {p: leaf for p, leaf in leaves_with_paths(got)}
    lines = [f"  missing: {p}" for p in want if p not in have]
    lines += [f"  unexpected: {p}" for p in have if p not in want]
    for p in want.keys() & have.keys():
        a, b = want[p], have[p]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            lines.append(f"  shape of {p}: expected {tuple(a.shape)}, got {tuple(b.shape)}")
    return "\n".join(sorted(lines)) or "  (same paths, different node types)"


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape
    return not isinstance(b, torch.Tensor)


def check_same_structure(expected: Any, got: Any, what: str) -> None:
    """Raises ValueError listing missing, unexpected and reshaped paths if the trees differ.

    Examples:
        >>> params = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
        >>> fx.tree.check_same_structure(params, {"w": torch.ones(2, 3), "b": torch.ones(3)},
        ...                              "the gradients")  # same paths and shapes: silent
        >>> fx.tree.check_same_structure(params, {"w": torch.ones(3, 2)}, "the gradients")
        Traceback (most recent call last):
        ...
        ValueError: the gradients does not match the parameter tree:
          missing: ['b']
          shape of ['w']: expected (2, 3), got (3, 2)
    """
    if type(expected) is dict and type(got) is dict and expected.keys() == got.keys() and all(
            isinstance(expected[k], torch.Tensor) and isinstance(got[k], torch.Tensor)
            and expected[k].shape == got[k].shape for k in expected):
        return  # the flat-params case, without flattening (fewer guards and calls compiled)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    g_leaves, g_spec = pytree.tree_flatten(got)
    same = e_spec == g_spec and all(_same_leaf(a, b) for a, b in zip(e_leaves, g_leaves))
    if not same:
        raise ValueError(f"{what} does not match the parameter tree:\n"
                         f"{_describe_mismatch(expected, got)}")


def leaf_record(path: str, leaf: Any) -> tuple[str, str, tuple[int, ...], bytes]:
    """What the digest hashes for one leaf: ``(path, dtype, shape, raw bytes)``."""
    if isinstance(leaf, torch.Tensor):
        t = leaf.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8)  # the bytes of any dtype, numpy's or not
        return path, str(t.dtype), tuple(t.shape), raw.numpy().tobytes()
    if isinstance(leaf, np.ndarray | np.generic):
        arr = np.asarray(leaf)  # (np.ascontiguousarray would make 0-d arrays 1-d)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        return path, str(arr.dtype), arr.shape, arr.tobytes()
    return path, type(leaf).__name__, (), repr(leaf).encode()


def digest_items(items: Iterable[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """sha256 over ``(path, dtype, shape, raw bytes)`` records, in the order given."""
    h = hashlib.sha256()
    for path, dtype, shape, raw in items:
        h.update(f"{path}|{dtype}|{tuple(shape)}|{len(raw)}|".encode())
        h.update(raw)
    return h.hexdigest()


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes, in sorted path order.

    Two states have the same digest exactly when they hold the same values bit for bit, so a
    resumed run can be compared with an uninterrupted one. Like dict equality, it does not
    depend on the order in which a dict's keys were inserted.

    Examples:
        >>> a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
        >>> digest = fx.tree_digest(a)
        >>> len(digest), digest == fx.tree_digest({"b": torch.tensor([0.0]), "w": a["w"].clone()})
        (64, True)
        >>> fx.tree_digest({**a, "b": torch.tensor([-0.0])}) == digest  # bits, not values
        False
        >>> fx.tree_digest({**a, "b": torch.tensor([0.0], dtype=torch.float64)}) == digest
        False
    """
    check_live(tree, "tree_digest")
    tree = gathered(tree)  # a sharded state's digest is its whole values' (every rank calls)
    leaves = sorted(leaves_with_paths(tree), key=lambda item: item[0])
    return digest_items(leaf_record(path, leaf) for path, leaf in leaves)
