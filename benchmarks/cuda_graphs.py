"""Time per step on a GPU, with and without CUDA graphs: fxtrain against the loops a user would
write instead, interleaved, on small models whose steps are bound by the host (Python, guards,
kernel launches), where CUDA graphs pay.

Models (AdamW, common.LR etc.):
  tiny, large   the MLPs of common.SIZES (64-64-10 at batch 32; 784-512-512-10 at batch 128)
  gpt2          transformers' GPT-2 from GPT2Config(n_layer=2, n_head=2, n_embd=64,
                vocab_size=256, n_positions=64), eager attention, dropout 0.1, batch 8 x 64
                (the model of benchmarks/compile_time.py; skipped without transformers)

Variants:
  eager           nn.Module + loss.backward() + torch.optim.AdamW(fused=True)
  compiled        torch.compile(model) + a torch.compile'd AdamW(foreach=True).step()
  compiled_graphs the same with torch.compile(model, mode="reduce-overhead") (torch's CUDA
                  graphs) and the optimizer step compiled likewise
  fx_step         torch.compile(fx.make_train_step(loss), fullgraph=True), donate=True, in a
                  Python loop
  fx_step_graphs  fx.cuda_graphed of that step, in a Python loop
  fx_fit          fx.fit with the compiled step and the standard host callbacks
                  (peers.standard_callbacks: progress bar, summary, throughput, lr_monitor)
  fx_fit_graphs   the same with fx.cuda_graphed(step)
  fx_fit_graphs_k8  the same with 8 steps per call (make_train_step(steps_per_call=8))

Each round runs every variant (in an order rotated every round) for ``steps`` timed steps after
its warm-up, synchronising the GPU at both ends; fit variants are timed as a long run minus a
short one (peers.long_minus_short). Medians over rounds, and ratios to ``compiled``.

Run (GPU only): python benchmarks/cuda_graphs.py [--rounds 5] [--steps 500] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fxtrain as fx
from common import B1, B2, EPS, LR, SIZES, WD, make_batches, make_mlp
from peers import Cycle, long_minus_short, quiet, standard_callbacks

VARIANTS = ("eager", "compiled", "compiled_graphs", "fx_step", "fx_step_graphs", "fx_fit",
            "fx_fit_graphs", "fx_fit_graphs_k8")
MODELS = ("tiny", "large", "gpt2")


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config)


def _model_and_batches(name: str):
    """(model on the GPU, 8 batches on the GPU, loss of (module output, batch))."""
    if name == "gpt2":
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, 256, (8, 64), generator=g),) for _ in range(8)]
        batches = [(ids.cuda(), ids.cuda()) for (ids,) in batches]

        def loss(out, batch):
            logits = out.logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   batch[1][:, 1:].reshape(-1))

        return _gpt2().cuda(), batches, loss
    sizes, batch = SIZES[name]
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(sizes, batch)]
    return make_mlp(sizes).cuda(), batches, lambda out, b: F.cross_entropy(out, b[1])


def _sync_timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _torch_loop(name: str, variant: str):
    model, batches, loss = _model_and_batches(name)
    mode = "reduce-overhead" if variant == "compiled_graphs" else None
    if variant == "eager":
        opt = torch.optim.AdamW(model.parameters(), LR, (B1, B2), EPS, WD, fused=True)
        forward, update = model, opt.step
    else:
        opt = torch.optim.AdamW(model.parameters(), LR, (B1, B2), EPS, WD, foreach=True)
        forward = torch.compile(model, mode=mode)
        update = torch.compile(opt.step, mode=mode)

    def run(steps: int) -> float:
        def loop():
            for i in range(steps):
                batch = batches[i % len(batches)]
                if mode:  # torch's CUDA graphs: a new iteration may overwrite the last's outputs
                    torch.compiler.cudagraph_mark_step_begin()
                opt.zero_grad(set_to_none=True)
                loss(forward(batch[0]), batch).backward()
                update()

        return _sync_timed(loop)

    return run


def _fx_loop(name: str, variant: str):
    model, batches, loss = _model_and_batches(name)
    k = 8 if variant.endswith("_k8") else 1
    state = fx.TrainState.create(model, fx.optim.adamw(LR, B1, B2, EPS, WD), seed=0)
    del model
    step = torch.compile(fx.make_train_step(lambda s, p, b: loss(s.apply(p, b[0]), b),
                                            donate=True if "step" in variant else None,
                                            steps_per_call=k), fullgraph=True)
    if "graphs" in variant:
        step = fx.cuda_graphed(step)
    holder = [state]
    if variant.startswith("fx_step"):
        def run(steps: int) -> float:
            def loop():
                for i in range(steps):
                    holder[0], _ = step(holder[0], batches[i % len(batches)])

            return _sync_timed(loop)

        return run

    sink = open(os.devnull, "w")  # noqa: SIM115 - open as long as the process
    host = standard_callbacks(sink, every=48 if k > 1 else 50)
    data = Cycle(batches)  # fit stacks K of them per call

    def run_once(n: int):
        whole = -(-n // k) * k
        start = holder[0].replace(data=None)

        def fit():
            holder[0] = fx.fit(start, step, data, callbacks=host,
                               max_steps=int(start.step) + whole)

        wall = _sync_timed(fit)
        return wall * n / whole, wall * n / whole

    timed = long_minus_short(run_once)
    return lambda steps: timed(steps)[0]


def _variant(name: str, variant: str):
    return _fx_loop(name, variant) if variant.startswith("fx_") else _torch_loop(name, variant)


def measure(name: str, rounds: int, steps: int, variants) -> dict:
    runs = {}
    for v in variants:
        try:
            with quiet():
                runs[v] = _variant(name, v)
                runs[v](max(steps // 5, 24))  # warm-up: compiles (and captures)
        except Exception as e:  # a variant torch cannot run here: reported, not fatal
            print(f"{name} {v}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    times = {v: [] for v in runs}
    for r in range(rounds):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for v in order:
            with quiet():
                times[v].append(runs[v](steps) / steps)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med.get("compiled")
    rows = {v: {"us_per_step": 1e6 * t, "vs_compiled": (base / t) if base else None}
            for v, t in med.items()}
    for v, row in rows.items():
        ratio = f"{row['vs_compiled']:.2f}x compiled" if row["vs_compiled"] else ""
        print(f"{name:6s} {v:18s} {row['us_per_step']:9.1f} us/step  {ratio}", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cuda_graphs.py needs a CUDA GPU (torch sees none)")
    if args.smoke:
        args.rounds, args.steps, args.models = 1, 48, ["tiny"]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rounds": args.rounds, "steps": args.steps, "models": {}}
    for name in args.models:
        if name == "gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("gpt2: skipped (no transformers)")
                continue
        out["models"][name] = measure(name, args.rounds, args.steps, args.variants)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
