"""Peak memory per trained parameter: fxtrain's fit with a compiled step against the loops a
user would write instead, AdamW on a stack of Linear(W, W) layers.

Each variant runs in its own process (``--smoke``: the first only) and reports its peak resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). Two depths are measured and the *slope*
(peak(deep) - peak(shallow)) / (params(deep) - params(shallow)) is the cost of one more
parameter: the interpreter, the imports and the compile caches cancel out.

Variants:
  eager       nn.Module + loss.backward() + torch.optim.AdamW(foreach=True), in place
  compiled    torch.compile(model) + a torch.compile'd AdamW(foreach=True).step()
  fx_fit      fx.fit with torch.compile(fx.make_train_step(loss)) (donates: the default)
  fx_pure     a user loop over the same compiled step built with donate=False
  fx_graphs   fx.fit with fx.cuda_graphed of the compiled step (GPU only)

Run: .venv/bin/python benchmarks/memory.py [--width 2048] [--depths 6 12] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from common import backend, in_fresh_process, slope, use_smoke_backend

HERE = Path(__file__).resolve().parent
VARIANTS = ("eager", "compiled", "fx_fit", "fx_pure", "fx_graphs")
LR, WD, STEPS, BATCH = 1e-3, 1e-2, 5, 16


def _model(width: int, depth: int):
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def _run(variant: str, width: int, depth: int, device: str) -> dict:
    """Trains ``STEPS`` steps in this process; returns the peak memory and the parameters."""
    import torch
    import torch.nn.functional as F
    import fxtrain as fx

    torch.set_num_threads(1)
    x = torch.randn(BATCH, width, device=device)
    batch = (x, torch.randn(BATCH, width, device=device))
    model = _model(width, depth).to(device)
    n = sum(p.numel() for p in model.parameters())

    def loss_of(out, y):
        return F.mse_loss(out, y)

    if variant in ("eager", "compiled"):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, foreach=True)
        forward = torch.compile(model, backend=backend()) if variant == "compiled" else model
        update = torch.compile(opt.step, backend=backend()) if variant == "compiled" else opt.step
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss_of(forward(batch[0]), batch[1]).backward()
            update()
    else:
        state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD))
        del model  # the state holds the weights; drop the model's own
        step = fx.make_train_step(lambda s, p, b: loss_of(s.apply(p, b[0]), b[1]),
                                  donate=False if variant == "fx_pure" else None)
        step = torch.compile(step, fullgraph=True, backend=backend())
        if variant == "fx_graphs":
            step = fx.cuda_graphed(step)
        if variant in ("fx_fit", "fx_graphs"):
            state = fx.fit(state, step, [batch] * STEPS, max_epochs=1)
        else:
            for _ in range(STEPS):
                state, _ = step(state, batch)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "depth": depth, "params": n, "peak_bytes": peak}


def measure(variant: str, width: int, depth: int, device: str, fresh: bool = True) -> dict:
    """``_run`` in a fresh process (so each peak is its own); with ``fresh=False`` in this one
    (a smoke run's later runs: their peaks are not reported, and a process start with its
    imports costs more than one of them)."""
    if not fresh:
        return _run(variant, width, depth, device)
    return in_fresh_process(__file__, [variant, str(width), str(depth), device],
                            f"{variant} at depth {depth}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depths", type=int, nargs=2, default=[6, 12])
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depths = 64, [1, 2]
        use_smoke_backend()
    if args.variants is None:  # CUDA graphs need a GPU
        args.variants = [v for v in VARIANTS if args.device == "cuda" or v != "fx_graphs"]
    rows = {}
    for variant in args.variants:  # the depths of one variant back to back, variants in turn
        # a smoke run starts a process for its first run only (the path of a full run)
        low, high = (measure(variant, args.width, d, args.device,
                             fresh=not args.smoke or (variant, d) == (args.variants[0],
                                                                      args.depths[0]))
                     for d in args.depths)
        rows[variant] = {"bytes_per_param": slope([low, high]), "runs": [low, high]}
    base = rows.get("eager", {}).get("bytes_per_param")
    for variant, row in rows.items():
        row["ratio_to_eager"] = row["bytes_per_param"] / base if base else None
        print(f"{variant:10s} {row['bytes_per_param']:6.1f} bytes/param"
              + (f"  {row['ratio_to_eager']:.2f}x eager" if base else ""), flush=True)
    return {"device": args.device, "width": args.width, "depths": args.depths, "rows": rows}


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, variant, width, depth, device = sys.argv
        print(json.dumps(_run(variant, int(width), int(depth), device)))
    else:
        print(json.dumps(main(), indent=1))
