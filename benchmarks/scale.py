"""Scale: the memory and speed of a GPT-2 large enough that activations matter, with and without
activation checkpointing, and on 2 ranks per-block sharded against data parallel.

The model is transformers' GPT-2 from a config (``--width 512``, 8 heads, sequence ``--seq 512``,
vocabulary 256, SDPA attention, dropout 0.1), trained with AdamW on random tokens (``--batch 2``
sequences per rank), one torch thread per process. Each variant runs at two depths
(``--depths 4 8``) in a process of its own: ``warmup`` steps (compiling), then ``steps`` timed
steps, whose tokens per second and peak resident set it reports (the peak count restarts after
the warm-up, as in ``transformer.py``). Memory is a slope over depth, bytes per parameter, so
what the interpreter and the imports hold cancels: of the tensors alive when the timed steps
begin (the state: parameters and optimizer state, and a loop's gradients, kept between its
steps) plus what the steps add to the resident set at their peak (gradients, activations, the
update's temporaries). The resident peak itself is reported too, but compiling leaves memory
in the heap that grows with depth, so its slope counts that as if it were per parameter.
Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's default threshold, kept fixed:
a freed large tensor goes back to the system instead of staying in the heap), so the resident
set follows the live tensors.

One process:

  loop             torch.compile(model) + loss.backward() + a compiled AdamW(foreach).step()
  loop_checkpoint  that loop with model.gradient_checkpointing_enable() (non-reentrant)
  fx_func          fx.fit, compiled step, gradients by torch.func (autodiff="func")
  fx_autograd      fx.fit, compiled step, gradients by torch.autograd.grad (autodiff="autograd")
  fx_remat         fx_autograd, each block through fx.remat (nothing_saveable)
  fx_remat_dots    fx_autograd, each block through fx.remat(policy="dots_saveable")

Two ranks (gloo; each rank its own batch of the same size; sequences of ``--rank-seq 64``
tokens, so that the parameters, gradients and optimizer state outweigh the activations; memory
is the higher rank's):

  one_process      fx_autograd in one process at these sizes (what a rank would hold alone)
  data_parallel    fx_autograd on 2 ranks, the state whole on each
  sharded          fx.shard(state, units="whole"): the whole model gathered once per step
  sharded_units    fx.shard(state, units="auto"): each GPT2Block gathered for its own forward
                   and again for its backward, its gradients reduce-scattered as they are ready

Run: python benchmarks/scale.py [--depths 4 8] [--steps 3] [--variants ...] [--smoke]
(``--smoke``: a tiny GPT-2 of one block, one step, compiled with aot_eager, so no slope, and
the variants of ``SMOKE``, each code path once; the one-process runs in this process, the
2-rank runs in one pair of processes.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import backend, in_fresh_process, slope, use_smoke_backend
from transformer import LR, WD, Cycle, _config, _loop, _loss, _process_peak, _restart_peak

SINGLE = ("loop", "loop_checkpoint", "fx_func", "fx_autograd", "fx_remat", "fx_remat_dots")
RANKS = ("one_process", "data_parallel", "sharded", "sharded_units")
# --smoke's variants: each code path once (the loop, and with checkpointing; the func and the
# autograd step, remat and its policy; data parallel; the per-block units, and so sharding);
# every variant of them all cost 6 minutes of a CI run's 2 cores
SMOKE = ("loop_checkpoint", "fx_func", "fx_remat_dots", "data_parallel", "sharded_units")
HEADS_PER_WIDTH = 64  # GPT-2's head size


def _model(variant: str, args, layers: int):
    """The GPT-2 of ``layers`` blocks, with the variant's activation checkpointing."""
    import torch
    from transformers import GPT2LMHeadModel

    import fxtrain as fx

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config(layers, args.width, max(1, args.width // HEADS_PER_WIDTH),
                                    args.seq))
    if variant == "loop_checkpoint":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if variant in ("fx_remat", "fx_remat_dots"):
        policy = "dots_saveable" if variant == "fx_remat_dots" else "nothing_saveable"
        for block in model.transformer.h:  # transformers calls this on each block's forward
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = functools.partial(fx.remat, policy=policy)
    return model


def _batches(args, seed: int) -> list:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (args.batch, args.seq), generator=g) for _ in range(4)]


def _fx_timed(state, args, batches, autodiff: str):
    """fx.fit's warm-up now, and the timed steps as a function."""
    import torch

    import fxtrain as fx

    step = torch.compile(fx.make_train_step(
        lambda s, p, ids: _loss(s.apply(p, ids, use_cache=False).logits, ids),
        autodiff=autodiff), fullgraph=True, backend=backend())
    data = Cycle(batches, 10**6)
    state = fx.fit(state, step, data, max_steps=args.warmup)
    return lambda: fx.fit(state.replace(data=None), step, data,
                          max_steps=args.warmup + args.steps)


def _resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes() -> int:
    """The bytes of every tensor storage alive in this process (each storage once)."""
    import gc

    import torch
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and type(obj) is torch.Tensor and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except (NotImplementedError, RuntimeError):
                continue  # a torch.func wrapper left by tracing: it owns no storage of its own
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _measure(warm, timed, args, world: int = 1) -> dict:
    """Runs ``warm`` (compiling) then ``timed``: tokens per second (all ranks'), the timed
    steps' own peak resident set, what was resident when they began (the state, the
    interpreter, the compiled code), so the peak less it is what a step adds (gradients,
    activations, the update's temporaries), and the tensors alive then (the state, and a
    loop's gradients, which it keeps between steps): ``held_bytes``, tensors held at rest plus
    what a step adds, is the step's peak in tensors, without what compiling left in the heap
    (it grows with depth too, so a slope of the resident set counts it as if per parameter)."""
    warm()
    _restart_peak("cpu")
    base, tensors = _resident(), _tensor_bytes()
    start = time.perf_counter()
    timed()
    seconds = time.perf_counter() - start
    peak = _process_peak("cpu")
    return {"tokens_per_s": world * args.steps * args.batch * args.seq / seconds,
            "step_s": seconds / args.steps, "step_peak_bytes": peak, "base_bytes": base,
            "transient_bytes": peak - base, "tensor_bytes": tensors,
            "held_bytes": tensors + peak - base}


def single(variant: str, args, layers: int) -> dict:
    """One process trains ``variant`` at ``layers`` blocks."""
    import torch

    import fxtrain as fx

    torch.set_num_threads(1)
    model = _model(variant, args, layers)
    n = sum(p.numel() for p in model.parameters())
    batches = _batches(args, 0)
    if variant.startswith("loop"):
        step = _loop("compiled", model, batches, "32", "cpu")
        run = {"warm": lambda: [step(i) for i in range(args.warmup)],
               "timed": lambda: [step(i) for i in range(args.steps)]}
    else:
        state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD), seed=0)
        del model  # the state holds the weights
        autodiff = "func" if variant == "fx_func" else "autograd"
        holder = {}
        run = {"warm": lambda: holder.setdefault("timed", _fx_timed(state, args, batches,
                                                                    autodiff)),
               "timed": lambda: holder["timed"]()}
    row = _measure(run["warm"], run["timed"], args)
    return {"variant": variant, "layers": layers, "params": n, **row}


def _rank(rank: int, world: int, port: int, variants: list[str], args, depths: list[int],
          out: str) -> None:
    """One rank of a 2-process job: trains each of ``variants`` at each of ``depths`` in turn,
    writes its rows."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    import fxtrain as fx

    torch.set_num_threads(1)
    fx.distributed.init()
    rows = []
    try:
        for variant, layers in ((v, d) for d in depths for v in variants):
            model = _model("fx_autograd", args, layers)
            n = sum(p.numel() for p in model.parameters())
            state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD), seed=0)
            del model
            if variant != "data_parallel":
                state = fx.shard(state, units="auto" if variant == "sharded_units" else "whole")
            local = fx.sharding.local_nbytes((state.params, state.opt_state))
            holder = {}
            row = _measure(lambda: holder.setdefault("timed", _fx_timed(
                               state, args, _batches(args, rank), "autograd")),
                           lambda: holder["timed"](), args, world)
            rows.append({"variant": variant, "layers": layers, "params": n, "rank": rank,
                         "local_state_bytes": local, "comm_s": _collectives_alone(variant, n),
                         **row})
            fx.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))


def _collectives_alone(variant: str, n: int, rounds: int = 3) -> float:
    """Seconds that one step's communication of ``variant`` takes alone, over ``n`` float32
    parameters in one buffer (no compute, median of ``rounds``): data parallel all-reduces the
    gradients; a sharded state all-gathers the parameters and reduce-scatters the gradients,
    per-block units gather twice (forward, and again for the backward). One buffer is a lower
    bound: the steps send a collective per dtype (data parallel) or per parameter (sharded)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    whole = torch.ones(n // world * world)
    shard = torch.ones(whole.numel() // world)
    gathers = {"data_parallel": 0, "sharded": 1, "sharded_units": 2}[variant]
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        if gathers == 0:
            dist.all_reduce(whole)
        for _ in range(gathers):
            dist.all_gather_into_tensor(whole, shard)
        if gathers:
            dist.reduce_scatter_single(shard, whole)
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(variants: list[str], args, depths: list[int]) -> list[dict]:
    """``variants`` at ``depths`` trained in turn by one pair of spawned processes: a row per
    variant and depth with the higher rank's peak and the slower rank's tokens per second."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, _port(), variants, args, depths, out), nprocs=2)
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = []
    for a, b in zip(*per_rank):
        rows.append({**a, "rank": None, "step_peak_bytes": max(a["step_peak_bytes"],
                                                               b["step_peak_bytes"]),
                     "comm_s": max(a["comm_s"], b["comm_s"]),
                     "tokens_per_s": min(a["tokens_per_s"], b["tokens_per_s"])})
    return rows


def _rank_config(args):
    """The 2-rank comparison's arguments: sequences of ``--rank-seq`` tokens, so that the
    parameters, their gradients and optimizer state outweigh the activations."""
    return argparse.Namespace(**{**vars(args), "seq": args.rank_seq})


def _one_process(args, layers: int) -> dict:
    """fx_autograd at the 2-rank comparison's sizes: what one rank of them would hold alone."""
    return {**single("fx_autograd", _rank_config(args), layers), "variant": "one_process"}


def child(kind: str, variant: str, args, layers: int) -> dict | list:
    if kind == "single":
        return _one_process(args, layers) if variant == "one_process" else \
            single(variant, args, layers)
    return ranks([variant], _rank_config(args), [layers])


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs=2, default=[4, 8])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank-seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=[*SINGLE, *RANKS])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.variants = args.variants or list(SMOKE if args.smoke else (*SINGLE, *RANKS))
    if args.smoke:  # one depth: no slope, the rows are there (a second depth cost 2 minutes)
        args.depths, args.width, args.seq, args.rank_seq, args.batch, args.warmup, \
            args.steps = [1], 64, 32, 16, 2, 1, 1
    return args


def _child_argv(args) -> list[str]:
    return ["--width", str(args.width), "--seq", str(args.seq), "--rank-seq",
            str(args.rank_seq), "--batch", str(args.batch), "--warmup", str(args.warmup),
            "--steps", str(args.steps)]


def _runs(args) -> dict[str, list[dict]]:
    """Each variant at each depth: in a fresh process each (a full run); a smoke run runs the
    one-process variants here and the 2-rank ones in one pair of spawned processes (the other
    benchmarks' smokes start fresh processes through the same ``in_fresh_process``)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the children's resident set: live tensors
    runs: dict[str, list[dict]] = {}
    single_variants = [v for v in args.variants if v in SINGLE or v == "one_process"]
    rank_variants = [v for v in args.variants if v in RANKS and v != "one_process"]
    for layers in args.depths:
        for variant in single_variants:
            if args.smoke:
                row = child("single", variant, args, layers)
            else:
                row = in_fresh_process(__file__, ["single", variant, str(layers),
                                                  *_child_argv(args)], f"{variant} x{layers}")
            runs.setdefault(variant, []).append(row)
    if args.smoke and rank_variants:
        rows = ranks(rank_variants, _rank_config(args), args.depths)
    else:
        rows = [row for v in rank_variants for layers in args.depths for row in in_fresh_process(
            __file__, ["ranks", v, str(layers), *_child_argv(args)], f"{v} x{layers}")]
    for row in rows:
        runs.setdefault(row["variant"], []).append(row)
    return runs


def main(argv=None) -> dict:
    args = _arguments(argv)
    if args.smoke:
        use_smoke_backend()
    import torch
    from fxtrain._torch.version import at_least

    not_run = {}
    if not at_least(2, 13):  # both shard on the autograd path: refused there (gradients.py)
        for variant in ("sharded", "sharded_units"):
            if variant in args.variants:
                not_run[variant] = ("a compiled autograd step on sharded parameters needs "
                                    f"torch 2.13 or later; this is torch {torch.__version__}")
                print(f"{variant}: not run ({not_run[variant]})", flush=True)
        args.variants = [v for v in args.variants if v not in not_run]
    runs = _runs(args)
    rows = {}
    for variant, pair in runs.items():
        two = len(pair) == 2
        rows[variant] = {"bytes_per_param": slope(pair, "held_bytes") if two else None,
                         "resident_per_param": slope(pair, "step_peak_bytes") if two else None,
                         "transient_per_param": slope(pair, "transient_bytes") if two else None,
                         "tokens_per_s": pair[-1]["tokens_per_s"], "runs": pair}
    base, one = rows.get("loop"), rows.get("one_process")
    for variant, row in rows.items():
        against = base if variant in SINGLE else one
        memory = row["bytes_per_param"]
        row["memory_vs"] = memory / against["bytes_per_param"] \
            if against and memory is not None else None
        row["speed_vs"] = row["tokens_per_s"] / against["tokens_per_s"] if against else None
        print(f"{variant:16s} {memory or 0:7.1f} B/param  {row['tokens_per_s']:8.1f} tokens/s"
              + (f"  speed {row['speed_vs']:.2f}x "
                 f"{'the compiled loop' if variant in SINGLE else 'one process'}"
                 if against else "")
              + (f", memory {row['memory_vs']:.2f}x" if row["memory_vs"] else ""), flush=True)
    return {"config": {"width": args.width, "seq": args.seq, "rank_seq": args.rank_seq,
                       "batch": args.batch,
                       "depths": args.depths, "vocab": 256, "steps": args.steps,
                       "warmup": args.warmup, "threads": 1}, "rows": rows, "not_run": not_run}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, kind, variant, layers, *rest = sys.argv
        print(json.dumps(child(kind, variant, _arguments(rest), int(layers))))
    else:
        print(json.dumps(main(), indent=1))
