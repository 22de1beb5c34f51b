"""``fxtrain demo``: trains a small classifier end to end with a compiled functional step.

A placeholder for the full demo (real data, callbacks, checkpoints, logs): it trains an MLP on
two interleaved spirals generated from the seed, and reports loss, accuracy and steps/s.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, optim
from .state import TrainState
from .step import make_eval_step, make_train_step

__all__ = ["spirals", "run_demo"]


def spirals(n: int, seed: int, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: ``n`` points in R^2 and their 0/1 labels."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * math.pi)
    return x + noise * torch.randn(n, 2, generator=g) / 3, label


def _loss_fn(state, params, batch):
    x, y = batch
    logits = state.apply(params, x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def run_demo(steps: int = 300, seed: int = 0, compile: bool = True, batch_size: int = 128) -> int:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 64), nn.GELU(), nn.Dropout(0.05), nn.Linear(64, 64),
                          nn.GELU(), nn.Linear(64, 2))
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(
        optim.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps), weight_decay=1e-4))
    state = TrainState.create(model, tx, seed=seed)
    x, y = spirals(4096, seed)
    x_test, y_test = spirals(1024, seed + 1)
    train_step, eval_step = make_train_step(_loss_fn), make_eval_step(_loss_fn)
    if compile:
        train_step = torch.compile(train_step, fullgraph=True)
        eval_step = torch.compile(eval_step, fullgraph=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    rank, world = distributed.rank(), distributed.world_size()
    order = order[rank::world]  # under torchrun each rank takes its share (data parallel step)
    say = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()
    for i in range(steps):
        idx = order[(i * batch_size) % len(order):][:batch_size]
        if len(idx) < batch_size:
            idx = order[:batch_size]
        state, metrics = train_step(state, (x[idx], y[idx]))
        if (i + 1) % max(1, steps // 6) == 0 or i + 1 == steps:
            say(f"step {i + 1:5d}  loss {float(metrics['loss']):.4f}  "
                  f"lr {float(metrics['learning_rate']):.2e}")
    elapsed = time.perf_counter() - start
    final = eval_step(state, (x_test, y_test))
    say(f"held-out accuracy {float(final['accuracy']):.3f}, loss {float(final['loss']):.4f}; "
          f"{steps} steps in {elapsed:.1f}s ({steps / elapsed:.0f} steps/s incl. compile)")
    return 0
