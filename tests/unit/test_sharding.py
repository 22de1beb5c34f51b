"""A sharded TrainState (fx.shard: DTensors on a DeviceMesh, FSDP-style) on 2 CPU processes
(gloo); the scenarios are in tests/dist_worker.py."""

import re

import pytest
import torch

import dist_worker
import fxtrain as fx
import fxtrain.checkpoint.store
import fxtrain.cli
from helpers import mlp


def test_a_mesh_shape_with_a_size_below_one_is_refused():
    """Issue 60, hole 9: mesh((-1, -2)) on 2 ranks (product 2) failed inside torch."""
    import re

    from helpers_distributed import free_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        for shape in ((-1, -1), (0, 1), (1, 0)):
            with pytest.raises(ValueError, match=re.escape(f"fx.sharding.mesh: shape {shape} ")
                               + ".*every size at least 1"):
                fx.sharding.mesh(shape)
    finally:
        torch.distributed.destroy_process_group()


def test_is_sharded_finds_a_dtensor_anywhere_in_a_tree():
    """A DTensor among a dict's tensors, nested in a dict or a list in it, or in a tuple; none
    in a tree of tensors and plain values."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from fxtrain.distributed._dtensors import is_sharded
    from helpers_distributed import free_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
        shard = distribute_tensor(torch.ones(2), mesh, [Shard(0)])
        plain = torch.ones(2)
        for tree in ({"a": plain, "b": shard}, {"a": plain, "b": {"c": shard}},
                     {"a": [1, shard]}, (plain, shard)):
            assert is_sharded(tree), tree
        for tree in ({"a": plain, "b": {"c": 2, "d": None}}, {}, (plain, [plain]), None, 3):
            assert not is_sharded(tree), tree
    finally:
        torch.distributed.destroy_process_group()
