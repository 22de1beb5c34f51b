"""Data parallel scaling on CPU: 2 processes (gloo) against 1, at the same batch per rank.

Each process runs ``fx.fit`` with a compiled ``make_train_step`` (gradients averaged over ranks
inside the graph) on its shard of ``fx.data.Batches``, one torch thread per process. Rounds
alternate 1 and 2 processes; each times ``--steps`` steps after a warm-up (compile) run.
Scaling efficiency = samples/s with 2 processes / (2 x samples/s with 1).

Run: python benchmarks/distributed.py [--rounds 3] [--steps 300] [--sizes tiny large] [--smoke]
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import fxtrain as fx
from common import SIZES, arguments, cross_entropy, make_mlp

def _worker(rank, world, port, size, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if world > 1:
        fx.distributed.init()
    sizes, batch = SIZES[size]
    g = torch.Generator().manual_seed(0)
    n = batch * world * 64
    data = fx.data.Batches((torch.randn(n, sizes[0], generator=g),
                            torch.randint(0, sizes[-1], (n,), generator=g)), batch)
    step = torch.compile(fx.make_train_step(cross_entropy), fullgraph=True)
    state = fx.TrainState.create(make_mlp(sizes), fx.optim.adamw(1e-3))
    state = fx.fit(state, step, data, max_steps=20)  # compile and warm up
    fx.distributed.barrier()
    start = time.perf_counter()
    state = fx.fit(state, step, data, max_steps=20 + steps)
    fx.distributed.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(steps * batch * world / elapsed))
    if world > 1:
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples_per_sec(world: int, size: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        mp.spawn(_worker, args=(world, _port(), size, steps, out), nprocs=world)
        with open(out) as f:
            return float(f.read())


def main(argv=None):
    args = arguments(__doc__, argv, rounds=3, steps=300)
    print(f"torch {torch.__version__}, fxtrain {fx.__version__}, {os.cpu_count()} CPUs, "
          "1 thread per process, gloo")
    results = {}
    for size in args.sizes:
        rates = {1: [], 2: []}
        for _ in range(args.rounds):
            for world in (1, 2):
                rates[world].append(samples_per_sec(world, size, args.steps))
        one, two = (statistics.median(rates[w]) for w in (1, 2))
        results[size] = {"1": one, "2": two, "efficiency": two / (2 * one)}
        print(f"{size} {SIZES[size]}: 1 process {one:.0f} samples/s, 2 processes {two:.0f} "
              f"samples/s, scaling efficiency {two / (2 * one):.2f}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
