"""fx.shard against torch's FSDP2, side by side: the same GPT-2 trained both ways on 2 and 4 gloo
ranks, eager and compiled, each run in fresh processes, the variants alternating.

The model is transformers' GPT-2 from a config (``--layers 4`` blocks of ``--width 512``, 8
heads, vocabulary 256, SDPA attention, dropout ``--dropout 0``), trained with AdamW (lr 3e-4,
weight decay 0.1) on random tokens, ``--batch 2`` sequences of ``--seq 128`` per rank, one torch
thread per process. Four variants:

  fxtrain_eager     fx.shard(state) (its default: a unit per GPT2Block), fx.make_train_step,
                    called uncompiled, donating the state as fx.fit does
  fxtrain_compiled  the same step through torch.compile(fullgraph=True)
  fsdp2_eager       as FSDP2's docs and torchtitan write it: fully_shard on each block, then on
                    the root; loss.backward(); torch.optim.AdamW(foreach=True), as torchtitan
                    builds it; zero_grad(set_to_none=True) before each step
  fsdp2_compiled    the same with each block torch.compile'd (fullgraph) before fully_shard, as
                    torchtitan's apply_compile does (the root, the loss and the optimizer eager)

and two more on request (``--variants``): ``fxtrain-plain_eager``, the loop a user writes
(``state, metrics = step(state, batch)``, no ``donate=``: a pure step, the update fused), and
``fxtrain-unfused_eager``, the donating step with AdamW's composable update (``tx.fused``
taken away: the update before ``fxtrain.optim.fused``).

Each rank trains ``--warmup`` steps (compiling), then ``--steps`` timed steps, and reports
(``scale.py``'s measure): the step time, the timed steps' peak resident set (peak RSS: the peak
count restarts after the warm-up through ``/proc/self/clear_refs``), and the held peak: the
tensors alive when the timed steps begin (the state, and FSDP2's gradients, which its loop keeps
between steps) plus what the steps add to the resident set at their peak. Memory is the higher
rank's, time the slower rank's. The processes run with ``MALLOC_MMAP_THRESHOLD_=131072``, so a
freed tensor leaves the resident set. Each round runs every variant at every number of ranks in
its own processes, in an order rotated each round; the ratios fx.shard / FSDP2 are taken within
a round (the machine is shared and noisy) and their median over the rounds is reported.

Run: python benchmarks/fsdp2.py [--rounds 3] [--worlds 2 4] [--out benchmarks/fsdp2] [--smoke]
(``--update`` times the AdamW update alone instead; ``--profile`` profiles one eager step)
(``--out P`` writes P.json and P.md, the table in RESULTS.md's style).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import backend, cpu_model, use_smoke_backend
from scale import _measure, _port

VARIANTS = ("fxtrain_eager", "fsdp2_eager", "fxtrain_compiled", "fsdp2_compiled",
            "fxtrain-plain_eager", "fxtrain-unfused_eager")
DEFAULT_VARIANTS = VARIANTS[:4]
MODES = ("eager", "compiled")
MEASURES = {"held_bytes": "held peak", "step_peak_bytes": "peak RSS", "step_s": "step time"}
TARGETS = {"held_bytes": 1.0, "step_s": 1.05}  # fx.shard / FSDP2, at most (issue 61)
LR, WD, VOCAB = 3e-4, 0.1, 256


def _model(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
        vocab_size=VOCAB, n_positions=args.seq, attn_implementation="sdpa",
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=0, eos_token_id=0, use_cache=False))


def _loss(logits, ids):
    import torch.nn.functional as F
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _fx_loss(state, params, ids):
    return _loss(state.apply(params, ids, use_cache=False).logits, ids)


def fxtrain(args, batches, compiled: bool, how: str = ""):
    """fx.shard's run: a function of the number of steps to train; ``how``: "" (donating, as
    fx.fit does), "plain" (a loop of one's own, no ``donate=``) or "unfused" (donating, AdamW's
    composable update)."""
    import torch

    import fxtrain as fx
    tx = fx.optim.adamw(LR, weight_decay=WD)
    tx = tx._replace(fused=None) if how == "unfused" else tx
    state = fx.shard(fx.TrainState.create(_model(args), tx))
    step = fx.make_train_step(_fx_loss)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=backend())
    held = {"state": state}
    del state
    donate = {} if how == "plain" else {"donate": True}

    def train(steps: int) -> None:
        state = held.pop("state")
        for i in range(steps):
            state, _ = step(state, batches[i % len(batches)], **donate)
        held["state"] = state

    return train


def fsdp2(args, batches, compiled: bool):
    """FSDP2's run (see the module): a function of the number of steps to train."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = _model(args)
    blocks = model.transformer.h
    for name, block in list(blocks.named_children()):
        if compiled:  # torchtitan's apply_compile: each block, before fully_shard
            block = torch.compile(block, backend=backend(), fullgraph=True)
            blocks.register_module(name, block)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, foreach=True)

    def train(steps: int) -> None:
        for i in range(steps):
            ids = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            _loss(model(ids, use_cache=False).logits, ids).backward()
            opt.step()

    return train


def run(variant: str, args, rank: int) -> dict:
    """This rank's row of ``variant``: its step time, peak RSS and held peak."""
    import torch
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=g) for _ in range(4)]
    kind, mode = variant.split("_")
    kind, _, how = kind.partition("-")
    train = fxtrain(args, batches, mode == "compiled", how) if kind == "fxtrain" else \
        fsdp2(args, batches, mode == "compiled")
    row = _measure(lambda: train(args.warmup), lambda: train(args.steps), args,
                   torch.distributed.get_world_size())
    return {"variant": variant, "rank": rank, **row}


def profiled(variant: str, args, rank: int, out: str) -> None:
    """One eager step of ``variant`` after ``--warmup`` ones, under torch.profiler with
    ``profile_memory``: rank 0 writes its trace to ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq), generator=g) for _ in range(4)]
    train = (fxtrain if variant.startswith("fxtrain") else fsdp2)(args, batches, False)
    train(args.warmup)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train(1)
    if rank == 0:
        prof.export_chrome_trace(out)


COLLECTIVES = ("all_gather_into_tensor", "allgather", "reduce_scatter_tensor", "FSDP::all_gather",
               "FSDP::post_backward_reduce", "aten::_foreach_add_", "adam")


def allocations(trace: str, top: int = 14) -> dict:
    """What a profiled step's trace says of its CPU allocations: the bytes allocated since the
    step began (the allocator's running total) at each collective, in order, with whether it
    ran in the backward; the peak; and the allocations alive at the peak, by the op that made
    them and the phase it ran in (forward, backward, after the backward)."""
    import bisect
    events = json.loads(Path(trace).read_text())["traceEvents"]
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in (
        "cpu_op", "user_annotation")), key=lambda e: e["ts"])
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    backward = [(e["ts"], e["ts"] + e["dur"]) for e in ops
                if e["name"].startswith("autograd::engine::evaluate_function")]
    first_b = min((b for b, _ in backward), default=float("inf"))
    last_b = max((e for _, e in backward), default=float("inf"))

    def phase(ts):
        return "forward" if ts < first_b else "backward" if ts <= last_b else "update"

    starts = [e["ts"] for e in ops]

    def op_at(ts):  # the innermost op running at ts
        i = bisect.bisect_right(starts, ts)
        best = None
        for e in reversed(ops[max(0, i - 400):i]):
            if e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["ts"] > best["ts"]):
                best = e
        return best["name"] if best else "?"

    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    live, peak, at_peak = {}, (0, 0), None
    for m in memory:
        a = m["args"]
        if a["Bytes"] > 0:
            live[a["Addr"]] = (a["Bytes"], m["ts"])
        else:
            live.pop(a["Addr"], None)
        total = a["Total Allocated"] - base
        if total > peak[0]:
            peak, at_peak = (total, m["ts"]), dict(live)
    totals = [(m["ts"], m["args"]["Total Allocated"] - base) for m in memory]
    stamps = [t for t, _ in totals]

    def total_at(ts):
        i = bisect.bisect_right(stamps, ts) - 1
        return totals[i][1] if i >= 0 else 0

    timeline = [(e["name"].split("::")[-1][:40], phase(e["ts"]), total_at(e["ts"]) / 2**20)
                for e in ops if any(c in e["name"] for c in COLLECTIVES)]
    ends = {"forward_end_mib": total_at(first_b) / 2**20, "backward_end_mib":
            total_at(last_b) / 2**20 if last_b < float("inf") else None}
    by_op: dict[tuple, list] = {}
    for nbytes, ts in at_peak.values():
        key = (phase(ts), op_at(ts))
        count, total = by_op.get(key, (0, 0))
        by_op[key] = (count + 1, total + nbytes)
    alive = sorted(((p, o, c, b / 2**20) for (p, o), (c, b) in by_op.items()),
                   key=lambda r: -r[3])[:top]
    return {"peak_mib": peak[0] / 2**20, "peak_phase": phase(peak[1]),
            "peak_op": op_at(peak[1]), **ends, "timeline": timeline, "alive_at_peak": alive}


def _rank(rank: int, world: int, port: int, variants: list[str], args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    import fxtrain as fx
    fx.distributed.init()
    rows = []
    try:
        for variant in variants:
            if args.profile:
                profiled(variant, args, rank, str(Path(out, f"{variant}.trace.json")))
            else:
                rows.append(run(variant, args, rank))
            fx.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))


def job(variants: list[str], world: int, args) -> dict[str, dict]:
    """``variants`` trained in turn by ``world`` fresh processes: each one's row, the higher
    rank's memory and the slower rank's time."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _port(), variants, args, out), nprocs=world)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    rows = {}
    for per_rank in zip(*ranks):
        rows[per_rank[0]["variant"]] = {
            "world": world, "held_bytes": max(r["held_bytes"] for r in per_rank),
            "step_peak_bytes": max(r["step_peak_bytes"] for r in per_rank),
            "transient_bytes": max(r["transient_bytes"] for r in per_rank),
            "tensor_bytes": max(r["tensor_bytes"] for r in per_rank),
            "step_s": max(r["step_s"] for r in per_rank)}
    return rows


def _jobs(args, round_: int) -> list[tuple[list[str], int]]:
    """A round's jobs: each variant at each number of ranks in processes of its own, the
    order rotated by the round; a smoke run trains every variant on one set of processes."""
    if args.smoke:
        return [(list(args.variants), world) for world in args.worlds]
    turn = round_ % len(args.variants)
    order = [*args.variants[turn:], *args.variants[:turn]]
    return [([variant], world) for world in args.worlds for variant in order]


def ratios(rounds: list[dict]) -> dict:
    """Per number of ranks and mode, each measure's fx.shard / FSDP2 ratio: the median over the
    rounds of the ratios within a round, with the rounds' own and the medians of the values."""
    table = {}
    kinds = sorted({v.split("_")[0] for r in rounds for rows in r.values() for v in rows
                    if v.startswith("fxtrain")}, key=len)
    for world in sorted({w for r in rounds for w in r}, key=int):
        for mode, kind in ((m, k) for m in MODES for k in kinds):
            pairs = [(r[world][f"{kind}_{mode}"], r[world][f"fsdp2_{mode}"]) for r in rounds
                     if f"{kind}_{mode}" in r.get(world, {}) and f"fsdp2_{mode}" in r[world]]
            if not pairs:
                continue
            how = kind.partition("-")[2]
            mode = f"{mode} ({how})" if how else mode
            entry = {}
            for key in MEASURES:
                each = [a[key] / b[key] for a, b in pairs]
                entry[key] = {"ratio": statistics.median(each), "rounds": each,
                              "fxtrain": statistics.median(a[key] for a, _ in pairs),
                              "fsdp2": statistics.median(b[key] for _, b in pairs)}
            table[f"{world}/{mode}"] = entry
    return table


def _figure(key: str, value: float) -> str:
    return f"{value * 1e3:.0f} ms" if key == "step_s" else f"{value / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
    """The side-by-side table, in RESULTS.md's style."""
    config = result["config"]
    lines = [f"## fx.shard against FSDP2 (`benchmarks/fsdp2.py`)", "",
             f"Command: `{result['command']}` ({result['minutes']:.1f} min, "
             f"{result['date']}; {result['machine']}; load average before, after: "
             f"{result['load'][0]:.2f}, {result['load'][1]:.2f})", "",
             f"GPT-2 from a config, {config['layers']} blocks of width {config['width']} "
             f"({config['params'] / 1e6:.1f}M parameters), {config['batch']} x {config['seq']} "
             f"tokens per rank, AdamW, gloo, one thread per rank; {config['rounds']} rounds, "
             "each variant in fresh processes. Each cell: fx.shard / FSDP2, the median of the "
             "rounds' ratios (their range), then the medians of the values.", "",
             "| ranks | mode | held peak | peak RSS | step time |", "|---|---|---|---|---|"]
    for name, entry in result["ratios"].items():
        world, mode = name.split("/")
        cells = []
        for key in MEASURES:
            e = entry[key]
            cells.append(f"{e['ratio']:.2f}x ({min(e['rounds']):.2f}-{max(e['rounds']):.2f}; "
                         f"{_figure(key, e['fxtrain'])} / {_figure(key, e['fsdp2'])})")
        lines.append(f"| {world} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 61): fx.shard at most "
              + " and ".join(f"{v:.2f}x FSDP2's {MEASURES[k]}" for k, v in TARGETS.items())
              + ", eager and compiled: "
              + "; ".join(f"{name} {'met' if all(entry[k]['ratio'] <= v for k, v in TARGETS.items()) else '**not met**'}"
                          for name, entry in result["ratios"].items()) + "."]
    return "\n".join(lines) + "\n"


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="profile one eager step of each on 2 ranks instead (allocations)")
    parser.add_argument("--update", action="store_true",
                        help="time the optimizer's update alone instead, one process (CPU seconds)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw",
                        help="--update's optimizer (against torch.optim's foreach one)")
    args = parser.parse_args(argv)
    if args.smoke:  # every variant on one pair of processes, tiny, compiled with aot_eager
        # (2 blocks: the per-block units and compiled blocks are several, at half the tracing)
        args.layers, args.width, args.seq, args.batch, args.warmup, args.steps, args.rounds, \
            args.worlds = 2, 64, 16, 2, 1, 1, 1, [2]
    return args


# --update's optimizers: (fxtrain's, torch.optim's with foreach=True), from the parameters
OPTIMIZERS = {
    "adamw": (lambda: fx_optim().adamw(LR, weight_decay=WD),
              lambda params: torch_optim().AdamW(params, LR, weight_decay=WD, foreach=True)),
    "sgd": (lambda: fx_optim().sgd(LR, momentum=0.9, weight_decay=WD),
            lambda params: torch_optim().SGD(params, LR, momentum=0.9, weight_decay=WD,
                                             foreach=True)),
    "rmsprop": (lambda: fx_optim().rmsprop(LR, momentum=0.9, weight_decay=WD),
                lambda params: torch_optim().RMSprop(params, LR, momentum=0.9, weight_decay=WD,
                                                     foreach=True)),
    "lion": (lambda: fx_optim().lion(LR, weight_decay=WD), None),  # not in torch.optim
}


def fx_optim():
    import fxtrain as fx
    return fx.optim


def torch_optim():
    import torch
    return torch.optim


UPDATES = ("fxtrain", "fxtrain_donated", "fxtrain_sharded_donated", "fxtrain_unfused_donated",
           "fxtrain_unfused_sharded_donated", "torch_foreach")


def _update_rank(port: int, args, out: str) -> None:
    """``--update``: one process (a 1-rank gloo group, so ``fx.shard`` makes DTensors) times the
    optimizer's update alone (``--optimizer``: AdamW, SGD or RMSprop with momentum and L2
    decay, Lion with its decay), as each variant runs it, in CPU seconds: fxtrain's functional
    update (eager: fused, ``fxtrain.optim.fused``), a donated one (in place), a sharded donated
    one (on the local shards), the composable update that ran before the fused one
    (``unfused``: ``tx.fused`` taken away), and torch.optim's ``foreach=True`` ``step()`` (Lion:
    none in torch.optim)."""
    import time

    import torch

    import fxtrain as fx
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)
    make_tx, make_torch = OPTIMIZERS[args.optimizer]
    tx = make_tx()

    def fxtrain_update(sharded: bool, donated: bool, fused: bool = True):
        state = fx.TrainState.create(_model(args), tx if fused else tx._replace(fused=None))
        state = fx.shard(state) if sharded else state
        grads = {k: torch.full_like(p, 1e-3) for k, p in state.params.items()}
        held = {"state": state}

        def update():
            state = held.pop("state")
            held["state"] = state.apply_gradients(grads, donated=donated)
        return update

    def torch_update():
        model = _model(args)
        opt = make_torch(model.parameters())
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        return opt.step

    made = {"fxtrain": lambda: fxtrain_update(False, False),
            "fxtrain_donated": lambda: fxtrain_update(False, True),
            "fxtrain_sharded_donated": lambda: fxtrain_update(True, True),
            "fxtrain_unfused_donated": lambda: fxtrain_update(False, True, fused=False),
            "fxtrain_unfused_sharded_donated": lambda: fxtrain_update(True, True, fused=False),
            "torch_foreach": torch_update}
    rows = {}
    for name in UPDATES:
        if name == "torch_foreach" and make_torch is None:
            continue
        update = made[name]()
        for _ in range(args.warmup):
            update()
        start = time.process_time()
        for _ in range(args.steps):
            update()
        rows[name] = (time.process_time() - start) / args.steps
    torch.distributed.destroy_process_group()
    Path(out).write_text(json.dumps(rows))


def updates(args) -> dict:
    """``--update``: the update's CPU seconds per variant, and each over torch's."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_update_spawned, args=(_port(), args, f"{out}/u.json"), nprocs=1)
        rows = json.loads(Path(out, "u.json").read_text())
    anchor, what = ("torch_foreach", f"torch.optim's {args.optimizer} (foreach=True)") \
        if "torch_foreach" in rows else ("fxtrain_unfused_donated", "the composable update's")
    for name, seconds in rows.items():
        print(f"{name:32s} {seconds * 1e3:8.1f} ms CPU  {seconds / rows[anchor]:.2f}x {what}")
    return rows


def _update_spawned(_: int, port: int, args, out: str) -> None:
    _update_rank(port, args, out)


def profile(args) -> dict:
    """``--profile``: each eager variant's allocations (``allocations``), rank 0's, 2 ranks."""
    import torch.multiprocessing as mp
    variants = [v for v in args.variants if v.endswith("eager")]
    found = {}
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, _port(), variants, args, out), nprocs=2)
        for variant in variants:
            found[variant] = allocations(str(Path(out, f"{variant}.trace.json")))
            if args.out:
                Path(f"{args.out}.{variant}.trace.json").write_bytes(
                    Path(out, f"{variant}.trace.json").read_bytes())
    for variant, f in found.items():
        print(f"\n{variant}: MiB allocated since the step began: {f['forward_end_mib']:.1f} at "
              f"the end of the forward, {f['backward_end_mib']:.1f} at the end of the backward, "
              f"peak {f['peak_mib']:.1f} in the {f['peak_phase']} ({f['peak_op']})")
        timeline = f["timeline"]
        every = max(1, len(timeline) // 24)
        print(f"  at {len(timeline)} collectives (every {every}th; f/b/u: forward, backward, "
              "update):")
        print("   " + ", ".join(f"{n}[{p[0]}] {m:.0f}" for n, p, m in timeline[::every]))
        print("  alive at the peak, by the op and phase that allocated it:")
        for p, o, c, m in f["alive_at_peak"]:
            print(f"    {m:8.1f} MiB  {c:5d} allocations  {p:8s} {o}")
    return found


def main(argv=None) -> dict:
    import time
    args = _arguments(argv)
    if args.smoke:
        use_smoke_backend()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the resident set follows live tensors
    if args.profile:
        return profile(args)
    if args.update:
        return updates(args)
    start, load = time.perf_counter(), os.getloadavg()[0]
    rounds = []
    for r in range(args.rounds):
        measured: dict[str, dict] = {}
        for variants, world in _jobs(args, r):
            variants = [v for v in variants if v in args.variants]
            if variants:
                measured.setdefault(str(world), {}).update(job(variants, world, args))
        rounds.append(measured)
        print(json.dumps(ratios(rounds[-1:]), indent=1), flush=True)
    result = {"config": {**{k: getattr(args, k) for k in (
                  "layers", "width", "seq", "batch", "dropout", "warmup", "steps", "rounds",
                  "worlds")}, "params": sum(p.numel() for p in _model(args).parameters())},
              "command": "python benchmarks/fsdp2.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "load": [load, os.getloadavg()[0]],
              "minutes": (time.perf_counter() - start) / 60,
              "rounds": rounds, "ratios": ratios(rounds)}
    text = markdown(result)
    print(text, flush=True)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
