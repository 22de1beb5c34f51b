"""GPT-2 124M on a GPU: fx.fit's paths against a torch.compile'd nanoGPT-style loop and against
transformers' Trainer, in tokens/s, MFU, peak memory per parameter, attention kernel and compile
time. The one benchmark of the GPU kit (``scripts/gpu.sh``; docs/benchmarks.md).

The model is GPT-2 124M (``--model nano``: ``nanogpt.GPT``, the shape of ``GPT2Config()``
written plainly; ``--model hf``: ``GPT2LMHeadModel(GPT2Config())`` with SDPA attention), trained
on random tokens, sequence ``--seq 1024``, ``--batch`` sequences per step (``auto``: the largest
that fits, from two eager steps at batch 1 and 2 and the device's memory, so the fx variants
must fit what the loop fits), AdamW (lr 3e-4, weight decay 0.1 on every parameter), bf16-mixed,
attention and residual dropout ``--dropout`` (several values: each its own set of runs). Each
variant runs in a process of its own, one after another (``--rounds``: the order rotates each
round, and tokens/s is the median):

  loop         torch.compile(model) + loss.backward() + torch.optim.AdamW(fused=True), autocast
               to bf16: nanoGPT's training loop. Its dropout is torch's own (unkeyed), inside
               the fused attention kernel
  fx_func      fx.fit, torch.compile(fx.make_train_step(loss, precision="bf16-mixed"),
               fullgraph=True): gradients by torch.func. Dropout is keyed on (seed, step), and
               SDPA with dropout runs as its math (see docs/concepts.md)
  fx_autograd  the same with autodiff="autograd"
  fx_graphed   fx_func's step through fx.cuda_graphed (a CUDA GPU only)
  fx_k         fx_func with steps_per_call=--k (K steps in one graph per call)
  fx_remat     fx_autograd with every block through fx.remat (nothing_saveable)
  fx_chunked   fx_func with the loss fx.losses.chunked_causal_lm of the final hidden states
               and the tied head weight, ``--chunk`` tokens at a time: never the whole logits
               (16384 by default: 8 chunks at batch 124, each a 3.3 GB float32 block; each
               chunk is unrolled into the compiled step, seconds of compiling apiece)
  fx_remat_chunked  fx_remat with fx_chunked's loss (``--model nano`` only, as fx_chunked)
  hf_trainer   transformers.Trainer, torch_compile=True, bf16=True, optim adamw_torch_fused,
               no clipping (its weight decay skips biases and norms, as it always does)

Per variant: tokens/s over ``--steps`` timed steps after ``--warmup`` (compiling, and capturing
for fx_graphed); MFU = tokens/s x (6 N + 12 L d T) / the device's dense bf16 peak (N the
parameters but the position embedding, L blocks of width d, T the sequence; ``--peak-tflops``,
else from the device's name); peak memory (``torch.cuda.max_memory_allocated`` over the whole
process, and over the timed steps) per parameter; the attention kernels that ran, read from a
profile of one more step (flash / efficient / cudnn, or ``none``: no fused kernel, the math);
the first step's seconds (compiling, from Inductor's on-disk cache when it holds the graphs:
the hits and misses are recorded). Targets (issue 48) are printed as met or not, and the
chunked variants against their full-logits ones (fx_func, fx_remat) where both ran.

``--device cpu --tiny`` runs every variant at a tiny size (2 blocks of width 64, vocabulary 256,
sequence 64) with torch.compile's ``aot_eager`` backend, the first variant in a process of its
own and the rest in this one: the suite's smoke test, so the kit cannot rot between GPU draws.

Run: python benchmarks/gpu_transformer.py [--model nano] [--variants ...] [--dropout 0 0.1]
     [--batch auto] [--steps 20] [--warmup 5] [--rounds 1] [--chunk 16384] [--out FILE.json]
     [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import backend, use_smoke_backend
from transformer import _process_peak as peak, _restart_peak as restart_peak

VARIANTS = ("loop", "fx_func", "fx_autograd", "fx_graphed", "fx_k", "fx_remat", "fx_chunked",
            "fx_remat_chunked", "hf_trainer")
REMAT = ("fx_remat", "fx_remat_chunked")
AUTOGRAD = ("fx_autograd", *REMAT)
CHUNKED = {"fx_chunked": "fx_func", "fx_remat_chunked": "fx_remat"}  # and the same, full logits
LR, WD = 3e-4, 0.1
PEAK_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
               ("L4", 121.0), ("A10", 125.0))  # dense bf16, by device name (SXM figures)
KERNELS = (("flash", ("flash_attention", "flash_fwd", "flash_bwd", "pytorch_flash")),
           ("efficient", ("efficient_attention", "fmha_cutlass", "mem_efficient")),
           ("cudnn", ("cudnn_attention", "fort_native_sdpa", "cudnn_generated")))
GPU_ONLY = ("fx_graphed",)


# -- the model, the data, the loss ------------------------------------------------------------


def shape(args):
    from nanogpt import Shape
    if args.tiny:
        return Shape(layers=2, heads=2, width=64, vocab=256, positions=args.seq,
                     dropout=args.dropout[0])
    return Shape(positions=max(args.seq, 1024), dropout=args.dropout[0])


def model_of(args):
    """The model, seeded, with ``block_call`` (or transformers' checkpointing hook) ready for
    fx.remat."""
    import torch
    torch.manual_seed(0)
    s = shape(args)
    if args.model == "nano":
        from nanogpt import GPT
        return GPT(s)
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        n_layer=s.layers, n_head=s.heads, n_embd=s.width, vocab_size=s.vocab,
        n_positions=s.positions, attn_implementation="sdpa", resid_pdrop=s.dropout,
        embd_pdrop=s.dropout, attn_pdrop=s.dropout, use_cache=False))


def logits_of(model_or_state, ids, params=None):
    out = (model_or_state(ids) if params is None else model_or_state.apply(params, ids))
    return out if hasattr(out, "shape") else out.logits


def loss_of(variant: str, args):
    """The step's ``loss_fn``: the cross-entropy of the logits, or (a ``CHUNKED`` variant)
    ``fx.losses.chunked_causal_lm`` of the hidden states after the final layer norm and the
    head's weight (the token embedding's, tied), ``--chunk`` tokens at a time. Both take
    position t's target to be token t + 1 and average over the batch's B x (T - 1) targets."""
    import fxtrain as fx
    from nanogpt import lm_loss
    if variant not in CHUNKED:
        return lambda s, p, ids: lm_loss(logits_of(s, ids, p), ids)

    def chunked(s, p, ids):
        hidden = s.apply(p, ids, head=False)
        return fx.losses.chunked_causal_lm(hidden, p["wte.weight"], ids, chunk_size=args.chunk)

    return chunked


def use_remat(model, args) -> None:
    """Every block through fx.remat (nothing_saveable) on the step's backward."""
    import fxtrain as fx
    if args.model == "nano":
        model.block_call = fx.remat
        return
    for block in model.transformer.h:  # transformers calls this hook on each block's forward
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = fx.remat


def batches_of(args, device, n=4):
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape(args).vocab, (args.batch, args.seq), generator=g).to(device)
            for _ in range(n)]


def flops_per_token(model, args) -> float:
    """6 N + 12 L d T: the matrix products' FLOPs of the forward and backward per token (N
    without the position embedding, which is a lookup), plus attention's scores and weighted
    values (PaLM's and nanoGPT's count; causal masking not subtracted)."""
    s = shape(args)
    n = sum(p.numel() for p in model.parameters()) - s.positions * s.width
    return 6 * n + 12 * s.layers * s.width * args.seq


def peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# -- what ran, and memory --------------------------------------------------------------------


def attention_kernels(names) -> str:
    """The fused attention kernels among profiled op and kernel names, or ``none``."""
    text = " ".join(names).lower()
    found = [kind for kind, marks in KERNELS if any(m in text for m in marks)]
    return "+".join(found) or "none"


def profiled(step, device) -> str:
    """``attention_kernels`` of one call of ``step()`` under torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    return attention_kernels({e.name for e in prof.events()})


def sync(device) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


# -- the variants: each (warm, timed, one) over the child's model and batches ----------------


def loop_variant(model, batches, args):
    """nanoGPT's loop: a compiled module, eager fused AdamW, autocast, backward."""
    import torch
    device = args.device
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD,
                            fused=device == "cuda", foreach=device != "cuda")
    forward = torch.compile(model, backend=backend())
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision != "32")
    from nanogpt import lm_loss
    counter = [0]

    def step():
        ids = batches[counter[0] % len(batches)]
        counter[0] += 1
        with autocast:
            loss = lm_loss(logits_of(forward, ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda n: [step() for _ in range(n)], args.batch * args.seq


class Cycle:
    """``batches`` in turn, ``n`` of them (fit's data)."""

    def __init__(self, batches, n=10**9):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def train_step_of(variant, model, args):
    """``(state, train_step, k)``: the fx variant's initial state and its step of ``k`` steps
    per call, not compiled yet."""
    import fxtrain as fx
    if variant in REMAT:
        use_remat(model, args)
    k = args.k if variant == "fx_k" else 1
    state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD), seed=0)
    return state, fx.make_train_step(
        loss_of(variant, args), precision=args.precision, steps_per_call=k,
        autodiff="autograd" if variant in AUTOGRAD else "func"), k


def fx_variant(variant, model, batches, args):
    """fx.fit over a compiled fx step; each call of the returned ``step`` is one fit call."""
    import torch

    import fxtrain as fx
    state, train_step, k = train_step_of(variant, model, args)
    train_step = torch.compile(train_step, fullgraph=True, backend=backend())
    if variant == "fx_graphed":
        train_step = fx.cuda_graphed(train_step)
    data, holder = Cycle(batches), [state]

    def calls(n):
        start = holder[0].replace(data=None)
        holder[0] = fx.fit(start, train_step, data, max_steps=int(start.step) + n * k,
                           progress=False)

    return lambda: calls(1), calls, k * args.batch * args.seq


def child(variant: str, args) -> dict:
    """Trains ``variant`` in this process: its row (or ``{"oom": batch}``)."""
    import torch
    device = args.device
    torch._dynamo.reset()  # a --tiny run's later variants run in one process
    torch._dynamo.utils.counters.clear()
    try:
        model = model_of(args).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, args)
        batches = batches_of(args, device)
        if variant == "hf_trainer":
            return {**trainer_row(model, batches, args), "params": n_params,
                    "flops_per_token": flops}
        build = loop_variant if variant == "loop" else (
            lambda m, b, a: fx_variant(variant, m, b, a))
        one, calls, tokens_per_call = build(model, batches, args)
        del model  # fx's state holds the weights
        start = time.perf_counter()
        one()  # compiles
        sync(device)
        first_s = time.perf_counter() - start
        calls(args.warmup - 1)
        sync(device)
        warm_s, warm_peak = time.perf_counter() - start, peak(device)
        restart_peak(device)
        start = time.perf_counter()
        calls(args.steps)
        sync(device)
        seconds = time.perf_counter() - start
        step_peak = peak(device)
        whole_peak = max(warm_peak, step_peak)
        kernels = profiled(one, device)
    except torch.cuda.OutOfMemoryError:
        return {"variant": variant, "oom": args.batch}
    counters = torch._dynamo.utils.counters["inductor"]
    return {"variant": variant, "params": n_params, "flops_per_token": flops,
            "batch": args.batch, "tokens_per_s": args.steps * tokens_per_call / seconds,
            "first_step_s": first_s, "warmup_s": warm_s, "attention": kernels,
            "peak_bytes": whole_peak, "step_peak_bytes": step_peak,
            "inductor_cache": {k: counters[f"fxgraph_cache_{k}"] for k in ("hit", "miss")}}


def trainer_row(model, batches, args) -> dict:
    """transformers.Trainer on the same model, data and optimizer settings, timed from the
    first step after the warm-up to the end of training by a callback."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from nanogpt import WithLoss
    device, marks = args.device, {}

    class Clock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == 1:
                sync(device)
                marks["first"] = time.perf_counter() - marks["start"]
            if state.global_step == args.warmup:
                sync(device)
                restart_peak(device)
                marks["timed"] = time.perf_counter()

        def on_train_end(self, targs, state, control, **kwargs):
            sync(device)
            marks["end"] = time.perf_counter()

    rows = [{"input_ids": ids, "labels": ids} for b in batches for ids in b.cpu()]
    total = args.warmup + args.steps
    data = [rows[i % len(rows)] for i in range(total * args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        targs = TrainingArguments(
            output_dir=folder, per_device_train_batch_size=args.batch, max_steps=total,
            learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0,
            bf16=args.precision != "32", torch_compile=True, torch_compile_backend=backend(),
            optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
            use_cpu=device == "cpu", logging_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trained = model if args.model == "hf" else WithLoss(model)
        trainer = Trainer(model=trained, args=targs, train_dataset=data,
                          callbacks=[Clock()])
        marks["start"] = time.perf_counter()
        try:
            trainer.train()
        except torch.cuda.OutOfMemoryError:
            return {"variant": "hf_trainer", "oom": args.batch}
    seconds = marks["end"] - marks["timed"]
    return {"variant": "hf_trainer", "batch": args.batch,
            "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "first_step_s": marks["first"], "warmup_s": marks["timed"] - marks["start"],
            "attention": "not profiled", "peak_bytes": peak(device),
            "step_peak_bytes": peak(device)}


# -- the largest batch that fits ---------------------------------------------------------------


def probe(args) -> dict:
    """Peak memory of two eager steps at batch 1 and at batch 2 (same process): the bytes a
    sequence adds and what the run holds whatever the batch."""
    import torch
    device = args.device
    model = model_of(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, fused=True)
    from nanogpt import lm_loss
    peaks = []
    for batch in (1, 2):
        ids = torch.randint(0, shape(args).vocab, (batch, args.seq), device=device)
        restart_peak(device)
        for _ in range(2):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = lm_loss(logits_of(model, ids), ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks.append(peak(device))
    per_sequence = peaks[1] - peaks[0]
    return {"per_sequence": per_sequence, "fixed": peaks[0] - per_sequence,
            "total": torch.cuda.get_device_properties(0).total_memory}


def largest_batch(found: dict, fraction: float = 0.8, multiple: int = 4) -> int:
    """The largest multiple of ``multiple`` sequences whose eager peak stays within ``fraction``
    of the device's memory (1 where not even that fits): eager holds more than a compiled
    step, so the compiled variants keep headroom."""
    room = fraction * found["total"] - found["fixed"]
    batch = int(room // max(found["per_sequence"], 1))
    return max(multiple * (batch // multiple), 1)


# -- the parent -------------------------------------------------------------------------------


def run_child(what: str, argv: list[str], fresh: bool) -> dict:
    """``child`` (or ``probe``) in a fresh process, so each peak is its own and each compile is
    cold but for Inductor's on-disk cache; a failure is a row with its error, not the end."""
    if not fresh:
        return main(["--child", what, *argv])
    out = subprocess.run([sys.executable, __file__, "--child", what, *argv],
                         capture_output=True, text=True)
    if out.returncode:
        return {"variant": what, "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment(args) -> dict:
    import torch
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": args.device, "cpu_threads": torch.get_num_threads()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory
                   / 2**30, cuda=torch.version.cuda, sdpa_flash=torch.backends.cuda
                   .flash_sdp_enabled())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (no nvidia-smi)"
    return env


def variants_here(args) -> list[str]:
    return [v for v in args.variants if args.device == "cuda" or v not in GPU_ONLY]


def measure_dropout(args, argv: list[str], saved=lambda rows: None) -> dict:
    """Every variant at ``args.dropout[0]`` for ``args.rounds`` rounds (the order rotated per
    round); a variant out of memory is run again at half the batch, twice at most. ``saved``
    gets the rows so far after each run (a stage cut off by its time limit keeps them)."""
    variants, runs = variants_here(args), {}
    for r in range(args.rounds):
        for i, variant in enumerate(variants[r % len(variants):] + variants[:r % len(variants)]):
            batch = int(runs.get(variant, [{}])[-1].get("batch", args.batch))
            for _ in range(3):
                fresh = not args.tiny or (r, i) == (0, 0)
                row = run_child(variant, [*argv, "--batch", str(batch)], fresh)
                if "oom" not in row or batch == 1:
                    break
                print(f"{variant}: out of memory at batch {batch}", file=sys.stderr, flush=True)
                batch = max(batch // 2, 1)
            runs.setdefault(variant, []).append(row)
            print(f"  dropout {args.dropout[0]} round {r} {variant}: " + summary(row),
                  file=sys.stderr, flush=True)
            saved({v: combined(rows) for v, rows in runs.items()})
    return {v: combined(rows) for v, rows in runs.items()}


def summary(row: dict) -> str:
    if "error" in row or "oom" in row:
        return row.get("error", f"out of memory at batch {row.get('oom')}").splitlines()[-1]
    return (f"{row['tokens_per_s']:.0f} tokens/s, batch {row['batch']}, first step "
            f"{row['first_step_s']:.1f} s, peak {row['peak_bytes'] / 2**30:.2f} GiB, "
            f"attention {row['attention']}")


def combined(rows: list[dict]) -> dict:
    """One variant's rounds: the first round's row (cold compile) with the median tokens/s."""
    good = [r for r in rows if "tokens_per_s" in r]
    if not good:
        return rows[-1]
    return {**good[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in good),
            "rounds": [r["tokens_per_s"] for r in good]}


def ratios(rows: dict, peak_tf: float | None) -> None:
    """Adds MFU, bytes per parameter and ratios to the loop to each good row (in place)."""
    base = rows.get("loop", {})
    for row in rows.values():
        if "tokens_per_s" not in row:
            continue
        row["bytes_per_param"] = row["peak_bytes"] / row["params"]
        row["mfu"] = (row["tokens_per_s"] * row["flops_per_token"] / (peak_tf * 1e12)
                      if peak_tf else None)
        if "tokens_per_s" in base:
            row["tokens_vs_loop"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["memory_vs_loop"] = row["peak_bytes"] / base["peak_bytes"]


def targets(record: dict) -> list[str]:
    """Issue 48's targets, each met or not, from the rows (those the run has)."""
    lines = []

    def check(what: str, value: float, bound: float, at_least: bool) -> None:
        met = value >= bound if at_least else value <= bound
        lines.append(f"{what} {value:.2f}x the loop (target {'>=' if at_least else '<='} "
                     f"{bound}x): {'met' if met else 'NOT met'}")

    for dropout, rows in record["dropouts"].items():
        for variant, what in (("fx_func", "fx.fit"), ("fx_chunked", "fx.fit + chunked loss")):
            row = rows.get(variant, {})
            if "tokens_vs_loop" in row:
                check(f"dropout {dropout}: {what} tokens/s", row["tokens_vs_loop"],
                      1.0 if float(dropout) == 0 else 0.9, at_least=True)
                check(f"dropout {dropout}: {what} peak memory", row["memory_vs_loop"], 1.0,
                      at_least=False)
        for variant, what in (("fx_remat", "fx.remat per block"),
                              ("fx_remat_chunked", "fx.remat per block + chunked loss")):
            if "memory_vs_loop" in rows.get(variant, {}):
                check(f"dropout {dropout}: {what} peak memory", rows[variant]["memory_vs_loop"],
                      0.5, at_least=False)
        fx = rows.get("fx_func", rows.get("fx_chunked", {}))  # fx.fit, either loss
        if float(dropout) == 0 and "attention" in fx:
            kept = fx["attention"] not in ("none", "not profiled")
            lines.append(f"dropout 0: fx.fit's attention kernel: {fx['attention']} (target: "
                         f"flash or efficient kept): {'met' if kept else 'NOT met'}")
    return lines


def against_full_logits(record: dict) -> list[str]:
    """Each chunked variant's tokens/s and peak memory over those of its variant with the whole
    logits (``CHUNKED``), where both ran; where only the chunked one did, where the other's
    figures are (each against its own run's loop)."""
    lines = []
    for dropout, rows in record["dropouts"].items():
        for chunked, full in CHUNKED.items():
            a, b = rows.get(chunked, {}), rows.get(full, {})
            if "tokens_per_s" not in a:
                continue
            if "tokens_per_s" not in b:
                lines.append(f"dropout {dropout}: {full} not in this run: compare "
                             f"{chunked}'s ratios to the loop with {full}'s from another run "
                             f"(the kit's core stage)")
                continue
            lines.append(f"dropout {dropout}: {chunked} against {full} (the whole logits): "
                         f"tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, peak "
                         f"memory {a['peak_bytes'] / b['peak_bytes']:.2f}x")
    return lines


def markdown(record: dict) -> str:
    """The rows as a table for benchmarks/gpu/RESULTS.md."""
    out = ["| dropout | variant | batch | tokens/s | vs loop | MFU | peak bytes/param | vs loop "
           "| attention | first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dropout, rows in record["dropouts"].items():
        for variant, row in rows.items():
            if "tokens_per_s" not in row:
                out.append(f"| {dropout} | {variant} | | {summary(row)} | | | | | | |")
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
            out.append(
                f"| {dropout} | {variant} | {row['batch']} | {row['tokens_per_s']:.0f} | "
                f"{row.get('tokens_vs_loop', math.nan):.2f}x | {mfu} | "
                f"{row['bytes_per_param']:.1f} | {row.get('memory_vs_loop', math.nan):.2f}x | "
                f"{row['attention']} | {row['first_step_s']:.1f} |")
    return "\n".join(out)


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", choices=["nano", "hf"])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all (but the chunked ones with --model hf)")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    parser.add_argument("--batch", default="auto", help="sequences per step, or auto")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="calls before the timed ones")
    parser.add_argument("--k", type=int, default=4, help="fx_k's steps per call")
    parser.add_argument("--chunk", type=int, default=16384,
                        help="the chunked variants' tokens per chunk of the loss")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke size (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="also write the record here")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.model == "nano" or v not in CHUNKED]
    if args.model == "hf" and set(args.variants) & set(CHUNKED):
        parser.error("--model hf: the chunked variants need nanogpt's hidden states (head=False);"
                     " leave them out of --variants")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        use_smoke_backend()
        args.seq, args.steps, args.warmup = min(args.seq, 64), min(args.steps, 3), 3
        args.k, args.chunk = min(args.k, 2), min(args.chunk, 64)
    if args.batch == "auto" and (args.tiny or args.device != "cuda"):
        args.batch = "4"
    if args.warmup < 3:
        parser.error("--warmup must be at least 3 (fx_graphed captures on its third call)")
    return args


def measure(args, argv: list[str]) -> dict:
    start = time.perf_counter()
    record = {"environment": environment(args), "model": args.model, "seq": args.seq,
              "chunk": args.chunk, "argv": argv, "dropouts": {}}
    if args.batch == "auto":
        found = run_child("probe", argv, fresh=True)
        if "error" in found:
            raise SystemExit(f"the batch probe failed:\n{found['error']}")
        args.batch = str(largest_batch(found))
        record["probe"] = found
        print(f"batch {args.batch} (probe: {found['per_sequence'] / 2**20:.0f} MiB a sequence, "
              f"{found['fixed'] / 2**30:.2f} GiB fixed)", file=sys.stderr, flush=True)
    record["batch"] = int(args.batch)
    peak_tf = peak_tflops(args, record["environment"]["device"])
    record["peak_tflops"] = peak_tf
    for dropout in args.dropout:
        one = argparse.Namespace(**{**vars(args), "dropout": [dropout]})

        def saved(rows, key=str(dropout)):
            ratios(rows, peak_tf)
            record["dropouts"][key] = rows
            if args.out:
                args.out.write_text(json.dumps(record, indent=1) + "\n")

        saved(measure_dropout(one, without(argv, "--dropout", "--batch") + [
            "--dropout", str(dropout)], saved))
    record["targets"] = targets(record)
    record["against_full_logits"] = against_full_logits(record)
    record["seconds"] = time.perf_counter() - start
    return record


def without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less ``options`` and the values that follow each."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in options
        if not skipping:
            out.append(a)
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        what, args = argv[1], arguments(argv[2:])
        if what == "probe":
            return probe(args)
        args.batch = int(args.batch)
        return child(what, args)
    args = arguments(argv)
    record = measure(args, argv)
    print(markdown(record))
    for line in record["targets"] + record["against_full_logits"]:
        print(line)
    print(f"{record['seconds']:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    result = main()
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(result))
