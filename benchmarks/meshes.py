"""Meshes: what each rank holds, by layout, on 4 gloo ranks against one process.

A Llama from a config (``--width 256``, 4 layers, MLP 4x, vocabulary 256, sequences of
``--seq 64`` tokens, AdamW), the global batch of ``--batch 8`` sequences shared by the data
replicas, eager steps (``fx.fit``, the default step), one torch thread per process. Each
layout runs in a job of its own, 4 processes (one process for ``one_process``):

  one_process   no mesh
  data_parallel the state whole on every rank
  fsdp          fx.shard(state): a 1-D mesh, per-block units
  tp            fx.shard(state, tp_plan="auto"): the model's own plan over 4 ranks
  fsdp_tp       fx.shard(state, mesh((2, 2), ("dp", "tp")), tp_plan="auto"): units sharded over
                the first dimension, the plan over the second
  hsdp          fx.shard(state, mesh((2, 2), ("replicate", "shard"))): replicated over the
                first dimension, per-block units sharded over the second

Reported per layout, the higher rank's: ``state_bytes``, the parameters and optimizer state
the rank holds (exact: ``fx.sharding.local_nbytes``), and ``held_bytes``, the step's peak in
tensors (the tensors alive when the timed steps begin, plus what the steps add to the
resident set at their peak: ``scale.py``'s measure), each against one process's.

Run: python benchmarks/meshes.py [--steps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from scale import _measure, _port
from transformer import Cycle

LAYOUTS = ("one_process", "data_parallel", "fsdp", "tp", "fsdp_tp", "hsdp")
MESHES = {"fsdp_tp": ("dp", "tp"), "hsdp": ("replicate", "shard")}


def _model(args):
    import torch
    import transformers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.width, intermediate_size=4 * args.width,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=args.seq, use_cache=False))


def _loss(state, params, ids):
    import fxtrain as fx
    return fx.losses.causal_lm(state.apply(params, ids).logits, ids)


def _sharded(state, layout: str):
    import fxtrain as fx
    if layout in ("one_process", "data_parallel"):
        return state
    if layout == "fsdp":
        return fx.shard(state)
    if layout == "tp":
        return fx.shard(state, tp_plan="auto")
    mesh = fx.sharding.mesh((2, 2), MESHES[layout])
    return fx.shard(state, mesh, tp_plan="auto" if layout == "fsdp_tp" else None)


def train(layout: str, args, rank: int = 0) -> dict:
    """This process's row of ``layout`` (its state's bytes, its step's peak)."""
    import torch

    import fxtrain as fx

    torch.set_num_threads(1)
    state = _sharded(fx.TrainState.create(_model(args), fx.optim.adamw(1e-3)), layout)
    share = args.batch // fx.distributed.data_world_size()
    g = torch.Generator().manual_seed(fx.distributed.data_rank())
    batches = [torch.randint(0, 256, (share, args.seq), generator=g) for _ in range(4)]
    step = fx.make_train_step(_loss)
    data, holder = Cycle(batches, 10**6), {}

    def warm():
        holder["state"] = fx.fit(state, step, data, max_steps=args.warmup)

    def timed():
        fx.fit(holder["state"].replace(data=None), step, data,
               max_steps=args.warmup + args.steps)

    local = fx.sharding.local_nbytes((state.params, state.opt_state))
    row = _measure(warm, timed, argparse.Namespace(steps=args.steps, batch=share, seq=args.seq))
    return {"layout": layout, "rank": rank, "state_bytes": local, **row}


def _rank(rank: int, world: int, port: int, layout: str, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    import fxtrain as fx
    fx.distributed.init()  # one process: no group
    try:
        row = train(layout, args, rank)
    finally:
        if fx.distributed.initialized():
            torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def job(layout: str, args) -> dict:
    """``layout``'s row: the higher rank's bytes of 4 processes (one process: its own), each
    a fresh process."""
    import torch.multiprocessing as mp
    world = 1 if layout == "one_process" else 4
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _port(), layout, args, out), nprocs=world)
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    top = max(rows, key=lambda r: r["held_bytes"])
    return {**top, "state_bytes": max(r["state_bytes"] for r in rows)}


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.seq, args.batch, args.steps = 32, 16, 4, 1
    return args


def main(argv=None) -> dict:
    args = _arguments(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the resident set follows live tensors
    rows = {layout: job(layout, args) for layout in args.layouts}
    one = rows.get("one_process")
    for layout, row in rows.items():
        if one:
            row["state_vs_one"] = row["state_bytes"] / one["state_bytes"]
            row["held_vs_one"] = row["held_bytes"] / one["held_bytes"]
        print(f"{layout:14s} state {row['state_bytes'] / 2**20:7.2f} MiB"
              f"  step peak {row['held_bytes'] / 2**20:7.2f} MiB"
              + (f"  ({row['state_vs_one']:.2f}x / {row['held_vs_one']:.2f}x one process)"
                 if one else ""), flush=True)
    return {"config": {"width": args.width, "seq": args.seq, "batch": args.batch,
                       "layers": 4, "vocab": 256, "steps": args.steps, "world": 4},
            "rows": rows}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
