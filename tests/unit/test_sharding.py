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
from test_distributed import results, spawn


def stored_chunks(path, leaf):
    """The shapes of the pieces torch.distributed.checkpoint stored for ``leaf``."""
    import torch.distributed.checkpoint as dcp
    key = next(e["key"] for e in fxtrain.checkpoint.store.read_meta(path)["leaves"]
               if e["path"] == leaf)
    chunks = dcp.FileSystemReader(path / "shards").read_metadata().state_dict_metadata[key].chunks
    return [tuple(c.sizes) for c in chunks]


# torch 2.11's Dynamo cannot take torch.autograd.grad with respect to DTensors
UNITS_COMPILED = pytest.mark.needs_torch(2, 13, "a compiled autograd step on sharded parameters")


def test_a_mesh_shape_with_a_size_below_one_is_refused():
    """Issue 60, hole 9: mesh((-1, -2)) on 2 ranks (product 2) failed inside torch."""
    import re

    from test_distributed import free_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        for shape in ((-1, -1), (0, 1), (1, 0)):
            with pytest.raises(ValueError, match=re.escape(f"fx.sharding.mesh: shape {shape} ")
                               + ".*every size at least 1"):
                fx.sharding.mesh(shape)
    finally:
        torch.distributed.destroy_process_group()
