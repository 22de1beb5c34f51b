"""Tokens per second and memory per parameter of a GPT-style transformer: fx.fit against the loops
a user would write instead, at the same precision; and bf16-mixed's loss curve against float32's.

The model is transformers' GPT-2 from a config (width 256, 4 heads, sequence 128, vocabulary
256, SDPA attention, dropout 0.1), trained on random token batches (batch 8) with AdamW at two
depths (``--depths 2 4`` layers). Variants, each in its own process at each depth (``--smoke``:
the first only, the rest in the parent), with one
torch thread (the machines are shared: a second thread waiting on a core another job holds
costs milliseconds per op):

  eager     nn.Module + loss.backward() + torch.optim.AdamW(foreach=True)
  compiled  torch.compile(model) + a torch.compile'd AdamW(foreach=True).step()
  fx_fit    fx.fit with torch.compile(fx.make_train_step(loss), fullgraph=True)

Each process trains ``warmup`` steps (compiling; Inductor's on-disk cache is the default one, so
a second run compiles from it: each process records its cache hits and misses), then ``steps``
timed steps; it reports their tokens per second and two peaks: the process's (the
resident set size on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU) and the timed steps'
own (after the warm-up, garbage is collected, freed heap pages go back to the system with glibc's
``malloc_trim`` and the peak count restarts: ``/proc/self/clear_refs``, or the CUDA allocator's
``reset_peak_memory_stats``). Memory is compared by the *slope* over the two depths,
(peak(deep) - peak(shallow)) / (params(deep) - params(shallow)): the interpreter, the imports
and what compiling costs whatever the depth cancel out; what a layer's parameters, optimizer
state, gradients and activations cost stays (activations grow with depth too, so the bytes per
parameter exceed AdamW's 16). On a GPU ``--peak-tflops`` adds the model FLOPs utilisation
(6 * params * tokens per second plus attention, over the device's peak).

``--curve N`` trains a smaller GPT-2 (``--curve-layers 2 --curve-width 128``, 4 x 64 tokens) with
fxtrain's compiled train step for N steps three times, in a process of its own, on 16 learnable
sequences (each repeats a random 8-token pattern) in a random order per pass: float32, bf16-mixed
(same initial state, same order) and float32 again in another order. The curves are mean losses
per pass over the 16 sequences; bf16-mixed is within noise when its largest gap to the first
float32 curve is no larger than the gap between the two float32 runs (the noise floor: what a
change of data order alone does).

Run: python benchmarks/transformer.py [--depths 2 4] [--steps 20] [--curve 320] [--smoke]
     [--device cpu] [--precision 32] [--peak-tflops 989] [--out FILE.json]
(with --curve 320 on the 2-core VM: 3.3 min when Inductor's on-disk cache holds the graphs,
9.4 min when it is empty: compiling dominates; --smoke compiles with aot_eager, see
common.backend: 84 s with an empty cache).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import resource
import sys
import time
from pathlib import Path

from common import backend, in_fresh_process, slope, use_smoke_backend

VARIANTS = ("eager", "compiled", "fx_fit")
LR, WD = 3e-4, 0.1
PATTERNS, PERIOD = 16, 8  # the curve's data: 16 sequences, each a repeated 8-token pattern


def _config(layers, width, heads, seq):
    from transformers import GPT2Config
    return GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=256,
                      n_positions=seq, attn_implementation="sdpa", resid_pdrop=0.1,
                      embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)


def _loss(logits, ids):
    import torch.nn.functional as F
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _fx_step(precision):
    import torch
    import fxtrain as fx
    return torch.compile(fx.make_train_step(
        lambda s, p, ids: _loss(s.apply(p, ids, use_cache=False).logits, ids),
        precision=precision), fullgraph=True, backend=backend())


# -- memory ---------------------------------------------------------------------------------


def _process_peak(device) -> int:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _restart_peak(device) -> None:
    """Frees what is garbage and restarts the peak count, so the next peak is the steps' own."""
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL(None).malloc_trim(0)  # glibc: freed heap pages back to the system
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the RSS


# -- one variant at one depth (in its own process) -------------------------------------------


def _loop(variant, model, batches, precision, device):
    """The eager or compiled loop's step function of the step index."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, foreach=True)
    forward = torch.compile(model, backend=backend()) if variant == "compiled" else model
    update = torch.compile(opt.step, backend=backend()) if variant == "compiled" else opt.step
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step(i):
        ids = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = _loss(forward(ids, use_cache=False).logits, ids)
        loss.backward()
        update()
    return step


class Cycle:
    """``n`` batches taken in turn from a list (fit's data)."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def child(variant: str, args) -> dict:
    """Trains ``variant`` at ``args.layers`` in this process: tokens/s, peaks, parameters."""
    import torch
    from transformers import GPT2LMHeadModel
    import fxtrain as fx

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    model = GPT2LMHeadModel(_config(args.layers, args.width, args.heads, args.seq)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.seq), generator=g).to(device)
               for _ in range(8)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    start = time.perf_counter()
    if variant in ("eager", "compiled"):
        step = _loop(variant, model, batches, args.precision, device)
        for i in range(args.warmup):
            step(i)

        def timed():
            for i in range(args.steps):
                step(i)
    else:
        state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD))
        del model  # the state holds the weights
        train_step, data = _fx_step(args.precision), Cycle(batches, 10**6)
        state = fx.fit(state, train_step, data, max_steps=args.warmup)

        def timed():
            fx.fit(state.replace(data=None), train_step, data, max_steps=args.warmup + args.steps)
    sync()
    warmup_s, warmup_peak = time.perf_counter() - start, _process_peak(device)
    cache = {k: torch._dynamo.utils.counters["inductor"][f"fxgraph_cache_{k}"]
             for k in ("hit", "miss")}
    _restart_peak(device)
    start, cpu = time.perf_counter(), time.process_time()
    timed()
    sync()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    step_peak = _process_peak(device)
    return {"variant": variant, "layers": args.layers, "params": n_params,
            "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "step_s": seconds / args.steps, "cpu_use": cpu / seconds, "warmup_s": warmup_s,
            "peak_bytes": max(warmup_peak, step_peak), "step_peak_bytes": step_peak,
            "inductor_cache": cache}


def run_child(what: str, argv: list[str], fresh: bool = True) -> dict:
    """``child`` or ``curve`` in a fresh process (so each peak is its own); with ``fresh=False``
    in this one (a smoke run's later runs: their peaks are not reported, and a process start
    with its imports costs more than one of them)."""
    if not fresh:
        return main(["--child", what, *argv])
    return in_fresh_process(__file__, [what, *argv], f"{what} {' '.join(argv)}", timeout=3600)


# -- the loss curves ------------------------------------------------------------------------


def _patterns(args):
    import torch
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (args.curve_batch, PERIOD), generator=g)
            .repeat(1, args.curve_seq // PERIOD).to(args.device) for _ in range(PATTERNS)]


def _train_curve(step, args, patterns, order_seed):
    """Losses per pass over the patterns (taken in a random order per pass), and the seconds
    it took (the first call compiles)."""
    import torch
    from transformers import GPT2LMHeadModel
    import fxtrain as fx

    start = time.perf_counter()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config(args.curve_layers, args.curve_width, args.heads,
                                    args.curve_seq))
    state = fx.TrainState.create(model.to(args.device), fx.optim.adamw(LR, weight_decay=WD))
    g = torch.Generator().manual_seed(order_seed)
    passes = args.curve // PATTERNS
    order = torch.cat([torch.randperm(PATTERNS, generator=g) for _ in range(passes)])
    losses = []
    for i in order.tolist():
        state, metrics = step(state, patterns[i])
        losses.append(metrics["loss"])
    return torch.stack(losses).float().cpu().view(-1, PATTERNS).mean(1), time.perf_counter() - start


def curve(args) -> dict:
    """float32 and bf16-mixed from one order, float32 from another: the gaps and the curves."""
    import torch
    torch.set_num_threads(args.threads)
    start, patterns = time.perf_counter(), _patterns(args)
    step32 = _fx_step("32")
    (f32, f32_s), (bf16, bf16_s), (other, other_s) = (
        _train_curve(step32, args, patterns, order_seed=0),
        _train_curve(_fx_step("bf16-mixed"), args, patterns, order_seed=0),
        _train_curve(step32, args, patterns, order_seed=1))
    gap, noise = (bf16 - f32).abs(), (other - f32).abs()
    return {"steps": len(f32) * PATTERNS, "passes": len(f32), "max_gap": float(gap.max()),
            "mean_gap": float(gap.mean()), "noise_max_gap": float(noise.max()),
            "noise_mean_gap": float(noise.mean()), "curve_32": f32.tolist(),
            "curve_bf16": bf16.tolist(), "curve_32_other_order": other.tolist(),
            "run_s": {"32": f32_s, "bf16-mixed": bf16_s, "32_other_order": other_s},
            "seconds": time.perf_counter() - start}


# -- the parent -----------------------------------------------------------------------------


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--layers", type=int, default=None, help="(a child's depth)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--curve", type=int, default=0, help="steps (a multiple of 16)")
    parser.add_argument("--curve-layers", type=int, default=2)
    parser.add_argument("--curve-width", type=int, default=128)
    parser.add_argument("--curve-seq", type=int, default=64)
    parser.add_argument("--curve-batch", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the record here")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        use_smoke_backend()
        args.depths, args.width, args.heads, args.seq, args.batch = [1, 2], 32, 2, 16, 2
        args.steps, args.warmup, args.curve = 3, 1, min(args.curve, 2 * PATTERNS) or PATTERNS
        args.curve_layers, args.curve_width, args.curve_seq, args.curve_batch = 1, 32, 16, 2
    return args


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0: a --smoke model's peaks can be equal at both depths (a slope of
    0 bytes per parameter), which divided the run by zero under a loaded machine."""
    return a / b if b else math.nan


def summarise(rows: dict, args) -> None:
    """Adds the slopes and the ratios to ``rows`` (in place) and prints them."""
    for row in rows.values():
        row["bytes_per_param"] = slope(row["runs"], "peak_bytes")
        row["step_bytes_per_param"] = slope(row["runs"], "step_peak_bytes")
        for run in row["runs"] if args.peak_tflops else ():
            flops = 6 * run["params"] + 12 * run["layers"] * args.width * args.seq
            run["mfu"] = flops * run["tokens_per_s"] / (args.peak_tflops * 1e12)
    for base in ("compiled", "eager"):
        if base not in rows:
            continue
        for row in rows.values():
            b = rows[base]
            row[f"tokens_vs_{base}"] = [r["tokens_per_s"] / s["tokens_per_s"]
                                        for r, s in zip(row["runs"], b["runs"])]
            row[f"memory_vs_{base}"] = ratio(row["bytes_per_param"], b["bytes_per_param"])
            row[f"step_memory_vs_{base}"] = ratio(row["step_bytes_per_param"],
                                                  b["step_bytes_per_param"])
    for variant, row in rows.items():
        print(f"{variant:9s} " + " ".join(f"{r['tokens_per_s']:6.0f}" for r in row["runs"])
              + f" tokens/s at {args.depths} layers; {row['bytes_per_param']:5.1f} bytes/param "
              f"(process peak), {row['step_bytes_per_param']:5.1f} (steps' peak)"
              + ("  vs compiled: " + ", ".join(f"{t:.2f}x" for t in row["tokens_vs_compiled"])
                 + f" tokens, {row['memory_vs_compiled']:.2f}x / "
                 f"{row['step_memory_vs_compiled']:.2f}x memory" if "compiled" in rows else ""),
              flush=True)


def measure(args, argv: list[str]) -> dict:
    """Every variant at both depths, then the curves; the record. A smoke run starts a process
    for its first run only (the path of a full run), then runs the rest in this one."""
    start, rows = time.perf_counter(), {v: {"runs": []} for v in args.variants}
    first = (args.depths[0], args.variants[0])
    for depth in args.depths:  # the variants in turn at one depth, then at the other
        for variant in args.variants:
            fresh = not args.smoke or (depth, variant) == first
            rows[variant]["runs"].append(
                run_child(variant, [*argv, "--layers", str(depth)], fresh))
    summarise(rows, args)
    record = {"device": args.device, "precision": args.precision, "depths": args.depths,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows}
    if args.curve:
        c = record["curve"] = run_child("curve", argv, fresh=not args.smoke)
        print(f"bf16-mixed vs float32 over {c['steps']} steps ({c['passes']} passes): largest "
              f"gap {c['max_gap']:.4f} (mean {c['mean_gap']:.4f}); float32 in another order: "
              f"{c['noise_max_gap']:.4f} (mean {c['noise_mean_gap']:.4f}); loss "
              f"{c['curve_32'][0]:.3f} -> {c['curve_32'][-1]:.3f} ({c['seconds']:.0f} s)",
              flush=True)
    record["seconds"] = time.perf_counter() - start
    return record


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        args = arguments(argv[2:])
        return curve(args) if argv[1] == "curve" else child(argv[1], args)
    args = arguments(argv)
    record = measure(args, argv)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(main()))
    else:
        print(json.dumps(main(), indent=1))
