import dataclasses

import optree
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from fxtrain import struct


@struct.dataclass
class Pair:
    a: object
    b: object
    tag: str = struct.field(static=True, default="t")


tensors = st.builds(lambda shape, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple), st.integers(0, 2**31))
leaves = st.one_of(tensors, st.none(), st.integers(-5, 5))
trees = st.recursive(leaves, lambda kids: st.one_of(
    st.dictionaries(st.sampled_from("xyz"), kids, min_size=1, max_size=3),
    st.lists(kids, min_size=1, max_size=3).map(tuple),
    st.builds(Pair, kids, kids, st.sampled_from(["s", "t"])),
), max_leaves=8)


def same(a, b):
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


@settings(max_examples=60, deadline=None)
@given(trees)
def test_round_trip_through_torch_pytree(tree):
    leaves, spec = pytree.tree_flatten(tree)
    back = pytree.tree_unflatten(leaves, spec)
    assert pytree.tree_structure(back) == spec
    assert same(back, tree)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_round_trip_through_optree(tree):
    leaves, spec = optree.tree_flatten(tree, namespace=struct.OPTREE_NAMESPACE, none_is_leaf=True)
    back = optree.tree_unflatten(spec, leaves)
    assert same(back, tree)
    assert optree.tree_structure(back, namespace=struct.OPTREE_NAMESPACE, none_is_leaf=True) == spec


@settings(max_examples=40, deadline=None)
@given(tensors, tensors)
def test_replace_never_mutates(a, b):
    p = Pair(a, a.clone())
    before = (p.a.clone(), p.b.clone())
    q = p.replace(a=b)
    assert q.a is b and q.b is p.b and q.tag == p.tag
    assert torch.equal(p.a, before[0]) and torch.equal(p.b, before[1])


def test_static_fields_are_structure_not_leaves():
    p = Pair(torch.ones(2), torch.zeros(()), tag="s")
    assert len(pytree.tree_leaves(p)) == 2
    assert pytree.tree_structure(p) != pytree.tree_structure(p.replace(tag="t"))
    paths = [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(p)[0]]
    assert paths == [".a", ".b"]
    paths = [str(p) for p in optree.tree_paths(p, namespace=struct.OPTREE_NAMESPACE)]
    assert len(paths) == 2


def test_frozen():
    p = Pair(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.a = 3
