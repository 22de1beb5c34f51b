import pytest
import torch

import fxtrain as fx
from fxtrain.tree import check_same_structure


def test_flat_dicts_of_same_shapes_pass():
    check_same_structure({"a": torch.zeros(2), "b": torch.zeros(3)},
                         {"a": torch.ones(2), "b": torch.ones(3)}, "x")


def test_nested_mismatch_under_equal_top_level_keys_is_caught():
    expected = {"a": {"w": torch.zeros(2)}, "b": torch.zeros(3)}
    got = {"a": {"v": torch.zeros(2)}, "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"missing: \['a'\]\['w'\]"):
        check_same_structure(expected, got, "the state")
    with pytest.raises(ValueError, match="shape"):
        check_same_structure(expected, {"a": {"w": torch.zeros(5)}, "b": torch.zeros(3)}, "s")


def test_tree_digest_sees_every_bit():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert fx.tree_digest(a) == fx.tree_digest(b)
    b["w"] = torch.tensor([1.0, 2.0000002])
    assert fx.tree_digest(a) != fx.tree_digest(b)
    assert fx.tree_digest(a) != fx.tree_digest({"w": a["w"].double(), "n": a["n"]})


@pytest.mark.parametrize("dtype,bits", [(torch.float32, torch.int32), (torch.bfloat16, torch.int16)])
def test_tree_digest_changes_with_every_single_bit_flip(dtype, bits):
    x = torch.tensor([1.5, -2.25], dtype=dtype)
    digest = fx.tree_digest({"x": x})
    assert len(digest) == 64 and int(digest, 16) >= 0  # a sha256 in hex
    width = torch.iinfo(bits).bits
    seen = {digest}
    for i in range(x.numel()):
        for bit in range(width):
            flipped = x.view(bits).clone()
            flipped[i] ^= torch.tensor(1, dtype=bits) << bit
            seen.add(fx.tree_digest({"x": flipped.view(dtype)}))
    assert len(seen) == 1 + x.numel() * width  # each flip gives its own digest
    assert fx.tree_digest({"x": x.view(bits)}) != digest  # the same bytes as another dtype


def test_tree_digest_ignores_dict_insertion_order_like_dict_equality():
    a = {"w": torch.tensor([1.0, 2.0]), "n": {"x": torch.tensor(3), "y": torch.tensor(4)}}
    b = {"n": {"y": torch.tensor(4), "x": torch.tensor(3)}, "w": torch.tensor([1.0, 2.0])}
    assert fx.tree_digest(a) == fx.tree_digest(b)
    assert fx.tree_digest(a) != fx.tree_digest({**b, "n": {"x": torch.tensor(4),
                                                           "y": torch.tensor(3)}})


def test_the_several_tree_map_for_torch_2_11_equals_torchs_and_refuses_other_structures():
    """fxtrain._torch.trees.map_several stands in for torch's multi-tree map while torch 2.11's
    Dynamo traces (it cannot trace torch's): same results on nested states, tuples and Nones,
    and a clear error for trees of other structures."""
    import torch.utils._pytree as pytree

    from fxtrain._torch.trees import map_several

    state = fx.TrainState.create(torch.nn.Linear(3, 2), fx.optim.adam(0.1))
    other = fx.tree.tree_map(lambda t: t + 1, state)
    fn = (lambda a, b: a - b if isinstance(a, torch.Tensor) else a)
    got, want = map_several(fn, state, other), pytree.tree_map(fn, state, other)
    assert fx.tree_digest(got) == fx.tree_digest(want)
    assert map_several(fn, (torch.ones(1), None), (torch.ones(1), None))[1] is None
    with pytest.raises(ValueError, match="differ in structure"):
        map_several(fn, {"a": torch.ones(1)}, {"b": torch.ones(1)})
    with pytest.raises(ValueError, match="differ in structure"):
        map_several(fn, (torch.ones(1),), [torch.ones(1)])
