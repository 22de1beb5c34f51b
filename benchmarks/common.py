"""What the step benchmarks share: the MLP sizes, the model, the loss and the common flags."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"tiny": ((64, 64, 10), 32), "large": ((784, 512, 512, 10), 128)}  # layers, batch


def make_mlp(sizes):
    """Linear layers of ``sizes`` with ReLU between, seeded."""
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def cross_entropy(state, params, batch):
    """The fxtrain loss function every variant trains."""
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def arguments(doc: str, argv, *, rounds: int, steps: int) -> argparse.Namespace:
    """``--rounds --steps --sizes --smoke``; ``--smoke`` is one round of 5 steps, tiny only."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.sizes = 1, 5, ["tiny"]
    return args
