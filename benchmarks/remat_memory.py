"""Peak memory per parameter of fxtrain's two gradient paths and of activation checkpointing
(``fx.remat``), against a compiled module + optimizer loop with and without
``torch.utils.checkpoint``: the probe behind the scale issue's design (a GPT-2 benchmark,
``scale.py``, is still to come; this one is not part of ``run_all``).

The model is a stack of residual MLP blocks ``h + W2 gelu(W1 h)`` (width ``--width``, hidden 4x)
and a linear head, trained with AdamW on a batch of ``--batch`` rows, so activations weigh as
much as parameters. Each variant runs ``--steps`` compiled steps in its own process at two depths;
the peak resident set size's slope over depth, (peak(deep) - peak(shallow)) / (params(deep) -
params(shallow)), is the cost of one more parameter with its gradients, optimizer state and
activations (the interpreter, the imports and the compiler cancel out).

Variants:
  fx_func         fx.make_train_step(loss) (torch.func.grad_and_value, the default)
  fx_autograd     fx.make_train_step(loss, autodiff="autograd") (torch.autograd.grad traced)
  fx_remat        fx_autograd, each block through fx.remat (nothing_saveable)
  fx_remat_dots   fx_autograd, each block through fx.remat(policy="dots_saveable")
  loop            torch.compile(model) + loss.backward() + a compiled AdamW(foreach).step()
  loop_checkpoint that loop, each block through torch.utils.checkpoint (non-reentrant)

Run: .venv/bin/python benchmarks/remat_memory.py [--width 256] [--batch 1024] [--depths 2 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

from common import in_fresh_process, slope

VARIANTS = ("fx_func", "fx_autograd", "fx_remat", "fx_remat_dots", "loop", "loop_checkpoint")


def _run(variant: str, width: int, batch: int, depth: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    import fxtrain as fx

    torch.set_num_threads(1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, h):
            return h + self.down(F.gelu(self.up(h)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.head = nn.Linear(width, 10)

        def forward(self, h):
            for block in self.blocks:
                if variant == "fx_remat":
                    h = fx.remat(block, h)
                elif variant == "fx_remat_dots":
                    h = fx.remat(block, h, policy="dots_saveable")
                elif variant == "loop_checkpoint":
                    h = checkpoint(block, h, use_reentrant=False)
                else:
                    h = block(h)
            return self.head(h)

    torch.manual_seed(0)
    model = Net()
    n = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    if variant.startswith("loop"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        forward, update = torch.compile(model), torch.compile(opt.step)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            update()
    else:
        def loss_fn(state, params, batch):
            return F.cross_entropy(state.apply(params, batch[0]), batch[1])

        state = fx.TrainState.create(model, fx.optim.adamw(1e-3))
        del model
        autodiff = "func" if variant == "fx_func" else "autograd"
        step = torch.compile(fx.make_train_step(loss_fn, autodiff=autodiff), fullgraph=True)
        for _ in range(steps):
            state, metrics = step(state, (x, y), donate=True)
        loss = metrics["loss"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "depth": depth, "params": n, "peak_bytes": peak,
            "loss": float(loss)}


def measure(variant: str, args, depth: int) -> dict:
    """``_run`` in a fresh process (so each peak is its own)."""
    return in_fresh_process(__file__, [variant, str(args.width), str(args.batch), str(depth),
                                       str(args.steps)], f"{variant} at depth {depth}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 6])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args(argv)
    rows = {}
    for variant in args.variants:
        low, high = (measure(variant, args, d) for d in args.depths)
        rows[variant] = {"bytes_per_param": slope([low, high]), "runs": [low, high]}
    base = rows.get("loop", {}).get("bytes_per_param")
    for variant, row in rows.items():
        row["vs_loop"] = row["bytes_per_param"] / base if base else None
        print(f"{variant:16s} {row['bytes_per_param']:6.1f} bytes/param"
              + (f"  {row['vs_loop']:.2f}x the compiled loop" if base else ""), flush=True)
    return {"width": args.width, "batch": args.batch, "depths": args.depths, "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, variant, width, batch, depth, steps = sys.argv
        print(json.dumps(_run(variant, int(width), int(batch), int(depth), int(steps))))
    else:
        print(json.dumps(main(), indent=1))
