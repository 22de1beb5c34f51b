"""What the tests of several processes share: free ports, launching 2 ranks on
``dist_worker.py``'s scenarios (``torch.multiprocessing`` or torchrun) and reading back what
they wrote, and the checks of sharded checkpoints and streamed batches those ranks leave."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain.checkpoint.store
from helpers import TESTS as HERE, extra


# -- test_distributed.py's helpers ----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name, *args, **kwargs):
    mp.spawn(dist_worker.spawned, args=(2, free_port(), name, args, kwargs), nprocs=2)


def results(out):
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def torchrun(*args, timeout=300, nproc=2, **popen):
    """``dist_worker.py *args`` under torchrun; ``--standalone``: its store binds a free port
    itself (a port found free and closed first could be taken by another test before)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", str(HERE / "dist_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def rank_of(torchrun_job, rank):
    """The process of ``rank`` under a torchrun job (its agent starts them in their own
    sessions)."""
    psutil = extra("psutil")
    family = psutil.Process(torchrun_job.pid).children(recursive=True)
    return next(p for p in family if "dist_worker.py" in " ".join(p.cmdline())
                and p.environ().get("RANK") == str(rank))


# -- test_sharding.py's helpers -------------------------------------------------------------------

def stored_chunks(path, leaf):
    """The shapes of the pieces torch.distributed.checkpoint stored for ``leaf``."""
    import torch.distributed.checkpoint as dcp
    key = next(e["key"] for e in fxtrain.checkpoint.store.read_meta(path)["leaves"]
               if e["path"] == leaf)
    chunks = dcp.FileSystemReader(path / "shards").read_metadata().state_dict_metadata[key].chunks
    return [tuple(c.sizes) for c in chunks]


# torch 2.11's Dynamo cannot take torch.autograd.grad with respect to DTensors
UNITS_COMPILED = pytest.mark.needs_torch(2, 13, "a compiled autograd step on sharded parameters")


# -- test_streaming.py's helpers ------------------------------------------------------------------

def digest(batches):
    return hashlib.sha256(json.dumps(batches).encode()).hexdigest()


def global_batches(out, tag, world):
    """Each step's example ids over the ranks, in rank order."""
    ranks = [torch.load(out / f"{tag}_rank{r}.pt") for r in range(world)]
    assert len({len(r["seen"]) for r in ranks}) == 1
    return [sum((r["seen"][i] for r in ranks), []) for i in range(len(ranks[0]["seen"]))], \
        ranks
