"""Tokens per second and peak memory of a GPT-style transformer: fx.fit against the loops a user
would write instead, at the same precision, and bf16-mixed's loss curve against float32's.

The model is transformers' GPT-2 from a config (default 4 layers, width 256, 4 heads, sequence
128, vocabulary 256, SDPA attention, dropout 0.1), trained on random token batches with AdamW.
Variants, each in its own process (so each peak is its own):

  eager     nn.Module + loss.backward() + torch.optim.AdamW(foreach=True)
  compiled  torch.compile(model) + a torch.compile'd AdamW(foreach=True).step()
  fx_fit    fx.fit with torch.compile(fx.make_train_step(loss), fullgraph=True)

Each process trains ``warmup`` steps (compiling), then ``steps`` timed steps; it reports tokens
per second of the timed steps and the peak memory (``torch.cuda.max_memory_allocated`` on a
GPU, the resident set size on the CPU, which includes the interpreter and compile caches, so
compare on one device only). On a GPU the model FLOPs utilisation is reported too (6 * params *
tokens per second plus attention, over the device's bf16 / tf32 peak given by ``--peak-tflops``).

``--curve N`` also trains fx.fit for N steps in float32 and in bf16-mixed from the same state
and batches and reports the largest gap between the two loss curves (smoothed over 20 steps).

Run: python benchmarks/transformer.py [--steps 20] [--warmup 3] [--precision 32]
     [--curve 300] [--device cpu] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("eager", "compiled", "fx_fit")
LR, WD = 3e-4, 0.1


def _config(args):
    from transformers import GPT2Config
    return GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                      vocab_size=256, n_positions=args.seq, attn_implementation="sdpa",
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _batches(args, n=8):
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (args.batch, args.seq), generator=g) for _ in range(n)]


def _loss(logits, ids):
    import torch.nn.functional as F
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _peak(device) -> int:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, args) -> dict:
    """Trains in this process; returns tokens/s and the peak memory."""
    import torch
    from transformers import GPT2LMHeadModel
    import fxtrain as fx

    torch.manual_seed(0)
    device = args.device
    model = GPT2LMHeadModel(_config(args)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    batches = [b.to(device) for b in _batches(args)]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if args.precision == "bf16-mixed" \
        else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if variant in ("eager", "compiled"):
        opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, foreach=True)
        forward = torch.compile(model) if variant == "compiled" else model
        update = torch.compile(opt.step) if variant == "compiled" else opt.step

        def step(i):
            ids = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            if autocast is None:
                loss = _loss(forward(ids, use_cache=False).logits, ids)
            else:
                with autocast:
                    loss = _loss(forward(ids, use_cache=False).logits, ids)
            loss.backward()
            update()

        for i in range(args.warmup):
            step(i)
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        sync()
        seconds = time.perf_counter() - start
    else:
        state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD))
        del model
        train_step = torch.compile(fx.make_train_step(
            lambda s, p, ids: _loss(s.apply(p, ids, use_cache=False).logits, ids),
            precision=args.precision), fullgraph=True)

        class Cycle:
            def __init__(self, n):
                self.n = n

            def __len__(self):
                return self.n

            def __iter__(self):
                return (batches[i % len(batches)] for i in range(self.n))

        data = Cycle(10**6)
        state = fx.fit(state, train_step, data, max_steps=args.warmup)
        sync()
        start = time.perf_counter()
        state = fx.fit(state.replace(data=None), train_step, data,
                       max_steps=args.warmup + args.steps)
        sync()
        seconds = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    return {"variant": variant, "tokens_per_s": tokens / seconds, "peak_bytes": _peak(device),
            "params": n_params, "step_s": seconds / args.steps}


def curve(args) -> dict:
    """The largest gap between fx.fit's float32 and bf16-mixed loss curves (smoothed)."""
    import torch
    from transformers import GPT2LMHeadModel
    import fxtrain as fx

    losses = {}
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        state = fx.TrainState.create(GPT2LMHeadModel(_config(args)).to(args.device),
                                     fx.optim.adamw(LR, weight_decay=WD))
        step = torch.compile(fx.make_train_step(
            lambda s, p, ids: _loss(s.apply(p, ids, use_cache=False).logits, ids),
            precision=precision), fullgraph=True)
        g = torch.Generator().manual_seed(1)
        # learnable data: each sequence repeats a short random pattern
        pattern = [torch.randint(0, 256, (args.batch, 8), generator=g) for _ in range(16)]
        seen = []
        for i in range(args.curve):
            ids = pattern[i % 16].repeat(1, args.seq // 8).to(args.device)
            state, metrics = step(state, ids)
            seen.append(metrics["loss"])
        losses[precision] = torch.stack(seen).float().cpu()
    smooth = {k: v.unfold(0, 20, 1).mean(-1) for k, v in losses.items()}
    gap = (smooth["32"] - smooth["bf16-mixed"]).abs()
    return {"steps": args.curve, "max_gap": float(gap.max()),
            "final_32": float(smooth["32"][-1]), "final_bf16": float(smooth["bf16-mixed"][-1]),
            "first_32": float(smooth["32"][0])}


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--curve", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.layers, args.width, args.heads, args.seq, args.batch = 1, 32, 2, 16, 2
        args.steps, args.warmup, args.curve = 3, 1, min(args.curve, 40)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], arguments(argv[2:]))
    args = arguments(argv)
    rows = {}
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", variant, *argv],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows.get("compiled")
    for variant, row in rows.items():
        if base:
            row["tokens_vs_compiled"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["memory_vs_compiled"] = row["peak_bytes"] / base["peak_bytes"]
        if args.peak_tflops:
            flops = 6 * row["params"] + 12 * args.layers * args.width * args.seq
            row["mfu"] = flops * row["tokens_per_s"] / (args.peak_tflops * 1e12)
        print(f"{variant:9s} {row['tokens_per_s']:10.0f} tokens/s  peak "
              f"{row['peak_bytes'] / 2**20:8.1f} MiB"
              + (f"  {row['tokens_vs_compiled']:.2f}x tokens, {row['memory_vs_compiled']:.2f}x "
                 "memory of compiled" if base else ""), flush=True)
    record = {"device": args.device, "precision": args.precision, "config": vars(args),
              "rows": rows}
    if args.curve:
        record["curve"] = curve(args)
        print(f"bf16-mixed vs float32 over {args.curve} steps: largest smoothed gap "
              f"{record['curve']['max_gap']:.4f} (loss {record['curve']['first_32']:.3f} -> "
              f"{record['curve']['final_32']:.3f} float32, {record['curve']['final_bf16']:.3f} "
              "bf16)", flush=True)
    return record


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(main()))
    else:
        print(json.dumps(main(), indent=1))
