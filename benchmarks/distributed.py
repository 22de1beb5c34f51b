"""Data parallel scaling on CPU: 2 processes (gloo) against 1, at the same batch per rank,
fxtrain (replicated and sharded) beside torch's DistributedDataParallel.

fxtrain: each process runs ``fx.fit`` with a compiled ``make_train_step`` (gradients averaged
over ranks inside the graph) on its shard of ``fx.data.Batches``. fxtrain sharded: the same, with
``fx.shard`` applied to the state after ``TrainState.create`` (parameters and AdamW moments split
over the ranks; the step gathers the parameters and reduce-scatters the gradients). torch DDP:
the same MLP in ``DistributedDataParallel`` (bucketed all-reduces overlapped with the backward),
eager or with the model ``torch.compile``'d, and ``torch.optim.AdamW``, on the same shards. One
torch thread per process. Each round runs every variant with 1 and then 2 processes,
interleaved; each times ``--steps`` steps after a warm-up (compile) of 20. Scaling efficiency =
samples/s with 2 processes / (2 x samples/s with 1).

A single process starts no process group, so there is nothing to shard over: the sharded
variant runs with 2 processes only, and its efficiency divides by the unsharded fxtrain's
1-process samples/s (the same step on the whole state). Memory: the bytes of parameters and
optimizer state one rank holds (``fx.sharding.local_nbytes``, the largest over the ranks) in
the sharded 2-process run, over those of the 1-process fxtrain state. Save: the bytes one rank
writes when the final state is saved with ``fx.checkpoint.save`` (sharded: its own shard file,
rank 0 also the metadata; the largest over the ranks), over those of the 1-process (orbax,
whole) checkpoint.

Run: python benchmarks/distributed.py [--rounds 3] [--steps 300] [--sizes tiny large] [--smoke]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

import fxtrain as fx
from common import B1, B2, EPS, LR, SIZES, WD, arguments, backend, cross_entropy, make_mlp

VARIANTS = ("fxtrain", "fxtrain_sharded", "ddp_eager", "ddp_compiled")
WORLDS = {"fxtrain_sharded": (2,)}  # variant -> its process counts, if not (1, 2)
SHARD_TARGET = 0.6  # per-rank state bytes on 2 ranks / on 1 process, at most


def worlds(variant: str) -> tuple[int, ...]:
    return WORLDS.get(variant, (1, 2))


def _fxtrain(state_args, data, steps, shard, ckpt):
    """Seconds for ``steps`` steps of fx.fit, after 20 to compile and warm up, the bytes of
    parameters and optimizer state this rank holds at the end, and the bytes this rank writes
    to save that state with ``fx.checkpoint.save`` (None for replicated data parallel, where
    rank 0 writes the whole state as one process does)."""
    step = torch.compile(fx.make_train_step(cross_entropy), fullgraph=True, backend=backend())
    state = fx.TrainState.create(*state_args)
    if shard:
        state = fx.shard(state)
    state = fx.fit(state, step, data, max_steps=20)
    fx.distributed.barrier()
    start = time.perf_counter()
    state = fx.fit(state, step, data, max_steps=20 + steps)
    fx.distributed.barrier()
    elapsed = time.perf_counter() - start
    written = _bytes_written(state, ckpt) if shard or fx.distributed.world_size() == 1 else None
    return elapsed, fx.sharding.local_nbytes((state.params, state.opt_state)), written


def _bytes_written(state, path: str) -> int:
    """Saves ``state`` at ``path``; the bytes of the files this rank wrote: a whole (orbax)
    checkpoint's, or of a sharded one this rank's shard file (rank 0 also writes the DCP
    metadata and fxtrain's leaf table)."""
    path = Path(fx.checkpoint.save(path, state))
    if not fx.sharding.is_sharded(state):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    rank = fx.distributed.rank()
    mine = [path / "shards" / f"__{rank}_0.distcp"]
    if rank == 0:
        mine += [path / "shards" / ".metadata", path / "fxtrain.json"]
    return sum(f.stat().st_size for f in mine)


def _ddp(model, data, steps, compiled):
    """Seconds for ``steps`` steps of a DistributedDataParallel loop, after 20 of warm-up."""
    if fx.distributed.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    forward = torch.compile(model, backend=backend()) if compiled else model
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


def _worker(rank, world, port, size, steps, out, variants):
    """Runs each of ``variants`` in turn on one process group; writes ``{out}.{variant}.{rank}``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if world > 1:
        fx.distributed.init()
    for variant in variants:
        _variant(rank, world, size, steps, f"{out}.{variant}.{rank}", variant)
    if world > 1:
        torch.distributed.destroy_process_group()


def _variant(rank, world, size, steps, out, variant):
    sizes, batch = SIZES[size]
    g = torch.Generator().manual_seed(0)
    n = batch * world * 64
    data = fx.data.Batches((torch.randn(n, sizes[0], generator=g),
                            torch.randint(0, sizes[-1], (n,), generator=g)), batch)
    state_bytes = written = None
    if variant.startswith("fxtrain"):
        tx = fx.optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
        elapsed, state_bytes, written = _fxtrain(
            (make_mlp(sizes), tx), data, steps, shard=variant == "fxtrain_sharded",
            ckpt=os.path.join(os.path.dirname(out), f"checkpoint-{variant}"))
    else:
        elapsed = _ddp(make_mlp(sizes), data, steps, compiled=variant == "ddp_compiled")
    with open(out, "w") as f:
        json.dump({"rate": steps * batch * world / elapsed, "state_bytes": state_bytes,
                   "written": written}, f)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, size: str, steps: int, variants: tuple[str, ...] = ("fxtrain",),
        fresh: bool = True) -> dict:
    """Each of ``variants`` run by ``world`` processes, in turn on the same processes (a full
    run passes one variant, so each is timed in processes of its own): variant -> (samples/s
    on rank 0's clock, the largest bytes of parameters and optimizer state a rank held, the
    largest bytes a rank wrote to save the state; None where not measured: DDP, replicated
    data parallel). ``fresh=False`` runs one process's run in this process (a smoke run's: a
    process start cost more than the run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        if world == 1 and not fresh:
            saved = dict(os.environ)  # the worker sets RANK, WORLD_SIZE...
            try:
                _worker(0, world, _port(), size, steps, out, variants)
            finally:
                os.environ.clear()
                os.environ.update(saved)
        else:
            mp.spawn(_worker, args=(world, _port(), size, steps, out, variants), nprocs=world)
        measured = {}
        for variant in variants:
            ranks = []
            for rank in range(world):
                with open(f"{out}.{variant}.{rank}") as f:
                    ranks.append(json.load(f))
            largest = [None if None in (vs := [r[key] for r in ranks]) else max(vs)
                       for key in ("state_bytes", "written")]
            measured[variant] = (ranks[0]["rate"], *largest)
    return measured


def _runs(smoke: bool) -> list[tuple[tuple[str, ...], int, bool]]:
    """A round's runs: (variants, processes, in fresh processes). A full run times each variant
    in processes of its own. A smoke run times nothing it reports: its first 1-process run
    spawns (a full run's path), the other 1-process runs run here, and the 2-process variants
    run in turn on one pair of spawned processes (a spawn costs more than its run)."""
    if not smoke:
        return [((v,), w, True) for v in VARIANTS for w in worlds(v)]
    ones = [v for v in VARIANTS if 1 in worlds(v)]
    return [(tuple(ones[:1]), 1, True), (tuple(ones[1:]), 1, False),
            (tuple(v for v in VARIANTS if 2 in worlds(v)), 2, True)]


def scaling(rates: dict) -> dict:
    """Each variant's median samples/s with 1 and 2 processes and its scaling efficiency (the
    sharded variant's 1-process figure is the unsharded fxtrain's)."""
    rows = {}
    for variant in VARIANTS:
        base = variant if 1 in worlds(variant) else "fxtrain"
        one, two = statistics.median(rates[base, 1]), statistics.median(rates[variant, 2])
        rows[variant] = {"1": one, "2": two, "efficiency": two / (2 * one)}
        if base != variant:
            rows[variant]["1_from"] = base
    return rows


def main(argv=None):
    args = arguments(__doc__, argv, rounds=3, steps=300)
    print(f"torch {torch.__version__}, fxtrain {fx.__version__}, {os.cpu_count()} CPUs, "
          "1 thread per process, gloo")
    results = {}
    for size in args.sizes:
        rates = {(v, w): [] for v in VARIANTS for w in worlds(v)}
        held = {}  # (variant, world) -> bytes of params + optimizer state per rank
        written = {}  # (variant, world) -> bytes a rank writes to save the state
        for _ in range(args.rounds):
            for variant, world, fresh in _runs(args.smoke):
                measured = run(world, size, args.steps, variant, fresh)
                for v, (rate, held[v, world], written[v, world]) in measured.items():
                    rates[v, world].append(rate)
        rows = scaling(rates)
        for variant, row in rows.items():
            print(f"{size} {SIZES[size]} {variant}: 1 process {row['1']:.0f} samples/s"
                  f"{' (' + row['1_from'] + ')' if '1_from' in row else ''}, 2 processes "
                  f"{row['2']:.0f} samples/s, scaling efficiency {row['efficiency']:.2f}")
        whole, sharded = held["fxtrain", 1], held["fxtrain_sharded", 2]
        memory = {"unsharded_1": whole, "sharded_2": sharded, "replicated_2": held["fxtrain", 2],
                  "ratio": sharded / whole, "target": SHARD_TARGET}
        print(f"{size} {SIZES[size]} params + optimizer state per rank: {whole} bytes in 1 "
              f"process, {sharded} sharded on 2 ranks: {sharded / whole:.3f} (target <= "
              f"{SHARD_TARGET})")
        full, mine = written["fxtrain", 1], written["fxtrain_sharded", 2]
        save = {"full_1": full, "sharded_2": mine, "ratio": mine / full,
                "target": SHARD_TARGET}
        print(f"{size} {SIZES[size]} bytes a rank writes to save the state: {full} in 1 "
              f"process (whole), {mine} sharded on 2 ranks: {mine / full:.3f} (target <= "
              f"{SHARD_TARGET})")
        # fxtrain's row at the top level (as before), the others under their names
        results[size] = {**rows["fxtrain"], **{v: rows[v] for v in VARIANTS[1:]},
                         "state_memory": memory, "save_bytes": save}
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
