"""The 2-rank tensor-parallel launch shared by tests/unit/test_tensor_parallel.py and
tests/ranks/test_tensor_parallel_ranks.py."""

import torch
import torch.multiprocessing as mp

import dist_worker
from helpers_distributed import free_port


# -- test_tensor_parallel.py's helpers ------------------------------------------------------------

def spawn(tmp_path, **kwargs):
    mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), "tensor_parallel",
                                                   (str(tmp_path),), kwargs))
    return [torch.load(tmp_path / f"tp_rank{r}.pt") for r in (0, 1)]
