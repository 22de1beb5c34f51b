"""benchmarks/simulate.py against real ranks: what one rank holds and moves, simulated on torch's
fake process group and fake tensors, is what a rank of 2 gloo processes holds and moves when it
trains the same model with fx.shard."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_distributed import free_port

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
EXACT = ("params_bytes", "opt_state_bytes", "held_bytes", "all_gather_bytes",
         "reduce_scatter_bytes", "all_reduce_bytes")
SEQ = 256  # enough tokens that the activations make the step's peak


def _simulate():
    sys.path.insert(0, str(BENCHMARKS))
    import simulate
    return simulate


def _rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import fxtrain as fx
    torch.set_num_threads(1)
    fx.distributed.init()
    try:  # the simulation's own measure, on real tensors over gloo
        row = _simulate().simulate("tiny", "fsdp", 2, "fxtrain", 1, SEQ, fake=False)
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def test_a_simulated_rank_holds_and_moves_what_a_real_one_does(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    real = json.loads((tmp_path / "rank0.json").read_text())
    simulate = _simulate()
    args = simulate._arguments(["--seq", str(SEQ)])
    simulated = simulate.job(("tiny", "fsdp", 2, "fxtrain"), args)  # a fresh process
    assert real["params_bytes"] > 0 and real["all_gather_bytes"] > real["params_bytes"]
    assert {k: simulated[k] for k in EXACT} == {k: real[k] for k in EXACT}
    # the tensors alive at the step's peak: the same ops make the same tensors, but a real
    # group's collectives free their buffers at other times than the fake group's (measured:
    # the real 2.5% over the simulated when a unit's gather copied its shards beside its
    # buffer, the simulated 5.4% over the real, 0.5 MB, since they are gathered in place); the
    # activations, a difference of two peaks, take that in (measured: the simulated 23% over
    # the real at this tiny size, a few MiB)
    assert simulated["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.08)
    assert simulated["activation_bytes"] == pytest.approx(real["activation_bytes"], rel=0.3)
