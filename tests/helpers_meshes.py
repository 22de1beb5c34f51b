"""The 4-rank runs on a 2 x 2 mesh (``mesh_jobs``, a fixture tests/conftest.py offers every
test: tests/ranks/test_meshes.py and tests/ranks/test_sequence_parallel_ranks.py read it)."""

import pytest
import torch.multiprocessing as mp

import dist_worker
from helpers import once_per_run
from helpers_distributed import free_port


# -- test_meshes.py's helpers ---------------------------------------------------------------------

def spawn(world, name, args, kwargs):
    mp.spawn(dist_worker.spawned, nprocs=world, args=(world, free_port(), name, args, kwargs))


LAYOUTS = ("fsdp_tp", "hsdp")


@pytest.fixture(scope="module")
def mesh_jobs(tmp_path_factory):
    """The 4-rank runs of the tests below and of the sequence-parallel test on a 2 x 2 mesh
    ("sp/"), in one launch (``dist_worker.several``; a 4-rank launch alone, 4 Pythons importing
    torch and the group's start, costs about 30 CPU-s), each layout writing into its own folder
    and saving its checkpoint there ("ckpt"); then each layout's checkpoint restored onto 2
    ranks ("two/", one launch for both); and the same 20 steps in this process, alone: no
    mesh, no plan ("one/"). Once per run."""
    from fxtrain._torch.version import at_least
    import sp_worker

    def make(out):
        jobs = []
        for layout in LAYOUTS:
            (out / layout / "two").mkdir(parents=True)
            compiled = layout == "fsdp_tp" and at_least(2, 13)  # compiled autograd on DTensors
            jobs.append(("tensor_parallel", (str(out / layout),), {
                "ckpt": str(out / layout / "ckpt"), "layout": layout, "compiled": compiled}))
        if at_least(2, 13):  # the sequence-parallel test's (needs_torch 2.13: a compiled step)
            (out / "sp").mkdir()
            jobs.append((sp_worker.sequence_parallel, (str(out / "sp"),), {"layout": "fsdp_tp"}))
        spawn(4, "several", (jobs,), {})
        spawn(2, "several", ([("restored_llama", (str(out / layout / "two"),
                                                  str(out / layout / "ckpt")), {})
                              for layout in LAYOUTS],), {})
        (out / "one").mkdir()
        dist_worker.tensor_parallel(str(out / "one"))

    return once_per_run(tmp_path_factory, "mesh_jobs", make)
