"""The optimizer state offloaded to the host (``fx.shard(offload="optimizer")``) against the
same sharded run without it, on ``--world`` ranks (gloo on the CPU; NCCL where CUDA is there):
where each rank's bytes live, what a step costs, and whether the two give the same bits
(issue 78's measure).

A Llama-shaped folder (``load_pretrained.py``'s, float32) is saved once and loaded by
``fx.from_pretrained`` with AdamW, per block, in the same processes for both runs, one at a
time, after an unmeasured warm-up run. Per rank and run:

- the host's ``RssAnon`` over the baseline once the state is loaded, read as
  ``load_pretrained.py`` reads it (``MALLOC_MMAP_THRESHOLD_=131072``: freed tensors leave the
  resident set), and on CUDA ``torch.cuda.memory_allocated()`` over its baseline: the moments
  (twice the parameters' shard) move from the second to the first. On a CPU-only machine host
  and device are one memory, so both runs hold the same there, and the device column reads
  "n/a";
- the median wall time of ``--steps`` eager steps after 2 of warm-up, runs alternated twice
  (plain, offloaded, offloaded, plain) so drift weighs on both alike, and the ratio offloaded
  over plain;
- whether params, optimizer state and losses after the steps are equal bit for bit.

Run: python benchmarks/offload.py [--world 2] [--layers 6] [--hidden 768] [--steps 10]
     [--smoke] [--out P: P.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from load_pretrained import MALLOC, _port, model_arguments, save_folder  # by name
from resident import _status

RUNS = (None, "optimizer", "optimizer", None)


def _loss(state, params, batch):
    return state.apply(params, input_ids=batch, labels=batch).loss


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def measure(folder: str, offload: str | None, steps: int, vocab: int) -> tuple[dict, list]:
    """One run on this rank: bytes after the load, step times, and the final leaves."""
    import gc

    import torch

    import fxtrain as fx
    gc.collect()
    fx.distributed.barrier()
    cuda = torch.cuda.is_available()
    base, device_base = _status("RssAnon"), torch.cuda.memory_allocated() if cuda else 0
    state = fx.from_pretrained(folder, fx.optim.adamw(1e-4, weight_decay=0.1),
                               offload=offload)
    host = _status("RssAnon") - base
    device = torch.cuda.memory_allocated() - device_base if cuda else None
    moments = sum(_local(x).untyped_storage().nbytes()
                  for x in torch.utils._pytree.tree_leaves(state.opt_state)
                  if isinstance(x, torch.Tensor) and x.ndim >= 1)
    ids = torch.randint(0, vocab, (2 * fx.distributed.world_size(), 64),
                        generator=torch.Generator().manual_seed(0))
    step = fx.make_train_step(_loss)
    times, losses = [], []
    for i in range(steps + 2):
        batch = ids[2 * fx.distributed.rank():2 * fx.distributed.rank() + 2]
        if cuda:
            batch = batch.cuda()
            torch.cuda.synchronize()
        start = time.perf_counter()
        state, metrics = step(state, batch, donate=True)
        losses.append(float(metrics["loss"]))  # a host read: the step has ended
        if i >= 2:
            times.append(time.perf_counter() - start)
    leaves = [_local(x).cpu() for x in torch.utils._pytree.tree_leaves(
        (state.params, state.opt_state)) if isinstance(x, torch.Tensor)]
    del state
    return {"host": host, "device": device, "moments": moments,
            "step": statistics.median(times)}, [losses, leaves]


def _rank(rank: int, world: int, port: int, folder: str, steps: int, vocab: int,
          out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    import fxtrain as fx
    torch.set_num_threads(1)
    fx.distributed.init()
    try:
        rows, finals = [], {}
        measure(folder, "optimizer", 1, vocab)  # warm-up: imports, first allocations, caches
        for offload in RUNS:
            row, final = measure(folder, offload, steps, vocab)
            rows.append({"offload": offload, **row})
            finals.setdefault(offload, final)
        (a_losses, a), (b_losses, b) = finals[None], finals["optimizer"]
        same = a_losses == b_losses and len(a) == len(b) and all(
            x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rows": rows, "same": same}))


def run(args) -> dict:
    import torch.multiprocessing as mp
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/model"
        save_folder(args, folder)
        os.environ.update(MALLOC)  # read by glibc when each process starts
        try:
            mp.spawn(_rank, args=(args.world, _port(), folder, args.steps, args.vocab, tmp),
                     nprocs=args.world)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    summary = []
    for r in ranks:
        by = {None: [], "optimizer": []}
        for row in r["rows"]:
            by[row["offload"]].append(row)
        summary.append({key or "plain": {
            "host": max(x["host"] for x in rows),
            "device": None if rows[0]["device"] is None else max(x["device"] for x in rows),
            "moments": rows[0]["moments"], "step": statistics.median(x["step"] for x in rows)}
            for key, rows in by.items()})
    ratio = max(s["optimizer"]["step"] / s["plain"]["step"] for s in summary)
    return {"argv": sys.argv[1:], "world": args.world, "ranks": ranks, "summary": summary,
            "ratio": ratio, "same": all(r["same"] for r in ranks)}


def report(result: dict) -> str:
    mib = 2**20
    lines = [f"fx.shard(offload='optimizer') against the same run without it, "
             f"{result['world']} ranks, AdamW (MiB per rank; step: median ms)",
             "| rank | run | host RssAnon | device allocated | optimizer state | step |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(result["summary"]):
        for run_name, row in s.items():
            device = "n/a" if row["device"] is None else f"{row['device'] / mib:.1f}"
            lines.append(f"| {i} | {run_name} | {row['host'] / mib:.1f} | {device} | "
                         f"{row['moments'] / mib:.1f} | {row['step'] * 1e3:.1f} |")
    lines.append(f"offloaded / plain step time (worst rank): {result['ratio']:.3f}x; "
                 f"the same bits: {result['same']}")
    return "\n".join(lines)


def _arguments(argv) -> argparse.Namespace:
    p = model_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.vocab, args.heads, args.steps = \
            2, 64, 128, 500, 4, 3
    return args


def main(argv=None) -> int:
    args = _arguments(argv)
    result = run(args)
    print(report(result))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
