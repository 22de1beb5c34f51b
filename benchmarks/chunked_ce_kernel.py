"""The chunked loss's operator on one chunk: its softmax and gradient as eager in-place ops
against the compiled kernel (``fxtrain.losses._chunked._softmax_grad_``).

One call of ``fxtrain::chunked_linear_cross_entropy`` (what a train step's forward runs for the
loss: the logits, the loss, their gradient, the hidden states' and the weight's gradients) on
``--rows`` tokens of width ``--width`` against a head of ``--vocab``, in one chunk, float32 or
bfloat16 inputs. The two paths are the same code with ``FUSED_MIN_LOGITS`` above or below the
block's size, timed alternately in one process (``--repeats`` rounds after one call of each:
the kernel's compile, whose seconds are printed), medians printed. ``--softmax-only`` times the
part the kernel replaces alone, on logits made once (the three matrix products leave it out).

Run: python benchmarks/chunked_ce_kernel.py [--rows 2048] [--dtype float32|bfloat16]
[--repeats 5] [--softmax-only] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxtrain.losses._chunked as cce

EAGER = 1 << 62  # FUSED_MIN_LOGITS no block reaches


def _op(hidden, weight, targets, dtype):
    return torch.ops.fxtrain.chunked_linear_cross_entropy(
        hidden, weight, None, targets, hidden.shape[0], -100, dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--softmax-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.width, generator=g).to(dtype)
    weight = (torch.randn(args.vocab, args.width, generator=g) * 0.05).to(dtype)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g)
    targets[::7] = -100
    hidden, weight, targets = (t.to(args.device) for t in (hidden, weight, targets))
    logits = hidden @ weight.T
    sync = torch.cuda.synchronize if hidden.is_cuda else (lambda: None)

    def run(path):
        cce.FUSED_MIN_LOGITS = 0 if path == "kernel" else EAGER
        block = logits.clone() if args.softmax_only else None
        sync()
        start = time.perf_counter()
        if not args.softmax_only:
            out = _op(hidden, weight, targets, dtype)
        elif path == "kernel":
            out = (cce._fused_grad_(block, targets, -100), block)
        else:  # the eager ops as _chunk runs them, on logits already made
            out = _eager_softmax(block, targets)
        sync()
        return time.perf_counter() - start, out

    first = {path: run(path) for path in ("eager", "kernel")}
    print(f"first calls (the kernel's compiles): {first['eager'][0]:.2f} s eager, "
          f"{first['kernel'][0]:.2f} s kernel")
    a, b = first["eager"][1], first["kernel"][1]
    grads = [(x.float(), y.float()) for x, y in zip(a[1:], b[1:]) if x.numel()]
    print(f"loss {float(a[0]):.6g}, difference {float(a[0] - b[0]):.3g}; largest gradient "
          f"difference {max(float((x - y).abs().max()) for x, y in grads):.3g}")
    times = {"eager": [], "kernel": []}
    for _ in range(args.repeats):
        for path in times:
            times[path].append(run(path)[0])
    med = {path: statistics.median(t) for path, t in times.items()}
    what = "softmax and gradient only" if args.softmax_only else "whole operator"
    print(f"{what}, {args.rows} x {args.vocab}, width {args.width}, {args.dtype}, "
          f"{torch.get_num_threads()} threads: median eager {med['eager']:.3f} s, kernel "
          f"{med['kernel']:.3f} s ({med['eager'] / med['kernel']:.2f}x); all: "
          + "; ".join(f"{p} " + " ".join(f"{t:.3f}" for t in ts) for p, ts in times.items()))


def _eager_softmax(logits, targets):
    """``_chunk``'s eager ops after the logits (the same lines)."""
    compute_dtype = logits.dtype
    logits = logits.float()
    labelled = targets != -100
    safe = torch.where(labelled, targets, 0)[:, None]
    picked = logits.gather(1, safe).squeeze(1)
    peak = logits.amax(1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    norm = exp.sum(1, keepdim=True)
    log_norm = (peak + norm.log()).squeeze(1)
    loss = torch.where(labelled, log_norm - picked, 0.0).sum()
    probs = exp.div_(norm).mul_(labelled[:, None])
    grad_logits = probs.scatter_add_(1, safe, -labelled[:, None].to(probs.dtype))
    return loss, grad_logits.to(compute_dtype)


if __name__ == "__main__":
    main()
