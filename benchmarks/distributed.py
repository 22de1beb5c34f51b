"""Data parallel scaling on CPU: 2 processes (gloo) against 1, at the same batch per rank,
fxtrain beside torch's DistributedDataParallel.

fxtrain: each process runs ``fx.fit`` with a compiled ``make_train_step`` (gradients averaged
over ranks inside the graph) on its shard of ``fx.data.Batches``. torch DDP: the same MLP in
``DistributedDataParallel`` (bucketed all-reduces overlapped with the backward), eager or with
the model ``torch.compile``'d, and ``torch.optim.AdamW``, on the same shards. One torch thread
per process. Each round runs every variant with 1 and then 2 processes, interleaved; each times
``--steps`` steps after a warm-up (compile) of 20. Scaling efficiency = samples/s with 2
processes / (2 x samples/s with 1).

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
from common import B1, B2, EPS, LR, SIZES, WD, arguments, cross_entropy, make_mlp

VARIANTS = ("fxtrain", "ddp_eager", "ddp_compiled")


def _fxtrain(state_args, data, steps):
    """Seconds for ``steps`` steps of fx.fit, after 20 to compile and warm up."""
    step = torch.compile(fx.make_train_step(cross_entropy), fullgraph=True)
    state = fx.TrainState.create(*state_args)
    state = fx.fit(state, step, data, max_steps=20)
    fx.distributed.barrier()
    start = time.perf_counter()
    fx.fit(state, step, data, max_steps=20 + steps)
    fx.distributed.barrier()
    return time.perf_counter() - start


def _ddp(model, data, steps, compiled):
    """Seconds for ``steps`` steps of a DistributedDataParallel loop, after 20 of warm-up."""
    if fx.distributed.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    batches = list(data)

    def one(i):
        x, y = batches[i % len(batches)]
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(20):
        one(i)
    fx.distributed.barrier()
    start = time.perf_counter()
    for i in range(steps):
        one(i)
    fx.distributed.barrier()
    return time.perf_counter() - start


def _worker(rank, world, port, size, steps, out, variant):
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
    if variant == "fxtrain":
        elapsed = _fxtrain((make_mlp(sizes), fx.optim.adamw(LR, b1=B1, b2=B2, eps=EPS,
                                                       weight_decay=WD)), data, steps)
    else:
        elapsed = _ddp(make_mlp(sizes), data, steps, compiled=variant == "ddp_compiled")
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(steps * batch * world / elapsed))
    if world > 1:
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples_per_sec(world: int, size: str, steps: int, variant: str = "fxtrain") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        mp.spawn(_worker, args=(world, _port(), size, steps, out, variant), nprocs=world)
        with open(out) as f:
            return float(f.read())


def main(argv=None):
    args = arguments(__doc__, argv, rounds=3, steps=300)
    print(f"torch {torch.__version__}, fxtrain {fx.__version__}, {os.cpu_count()} CPUs, "
          "1 thread per process, gloo")
    results = {}
    for size in args.sizes:
        rates = {(v, w): [] for v in VARIANTS for w in (1, 2)}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                for world in (1, 2):
                    rates[variant, world].append(samples_per_sec(world, size, args.steps,
                                                                 variant))
        rows = {}
        for variant in VARIANTS:
            one, two = (statistics.median(rates[variant, w]) for w in (1, 2))
            rows[variant] = {"1": one, "2": two, "efficiency": two / (2 * one)}
            print(f"{size} {SIZES[size]} {variant}: 1 process {one:.0f} samples/s, 2 processes "
                  f"{two:.0f} samples/s, scaling efficiency {two / (2 * one):.2f}")
        # fxtrain's row at the top level (as before), torch DDP's under its names
        results[size] = {**rows["fxtrain"], **{v: rows[v] for v in VARIANTS[1:]}}
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
