"""A process that destroys its process group and starts another (a notebook run again, one test
module after another) shards and steps on the new group: fx.sharding.mesh makes a mesh for it,
and DTensor's sharding caches, which match meshes by shape and names and not by group, no
longer hand a traced step the destroyed group's mesh."""

import pytest
import torch

import fxtrain as fx
from helpers_distributed import free_port

pytestmark = pytest.mark.compat


def _one_rank_group():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)


def _trained(tx, compiled, sharded=True):
    """Two steps of a small MLP, sharded over the process's group or whole."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    if compiled:
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    state = fx.TrainState.create(model, tx)
    state = fx.shard(state) if sharded else state
    for seed in range(2):
        state, _ = step(state, torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)))
    return state


def test_a_second_process_group_gets_its_own_mesh_and_a_compiled_step_on_it():
    """Found by CI: an eager clipped step (DTensor ops, which fill the sharding caches) on one
    group, then a compiled step on a second group failed tracing with "Group ... is not
    registered" (the first group's mesh, from the caches). Each group's steps now give the bits
    of the same steps unsharded."""
    clipped = fx.optim.chain(fx.optim.clip_by_global_norm(0.1), fx.optim.adam(1e-2))
    meshes = []
    for tx, compiled in ((clipped, False), (fx.optim.adamw(1e-2), True), (clipped, True)):
        _one_rank_group()
        try:
            mesh = fx.sharding.mesh()
            assert mesh.get_group() is torch.distributed.group.WORLD
            assert fx.sharding.mesh() is mesh  # made once per group
            meshes.append(mesh)
            state = _trained(tx, compiled)
            assert all(p.device_mesh.get_group() is torch.distributed.group.WORLD
                       for p in state.params.values())
            whole = {k: p.full_tensor() for k, p in state.params.items()}
        finally:
            torch.distributed.destroy_process_group()
        plain = _trained(tx, compiled, sharded=False).params  # on one rank: the same bits
        assert all(torch.equal(whole[k], plain[k]) for k in plain)
    assert len({id(m) for m in meshes}) == 3

