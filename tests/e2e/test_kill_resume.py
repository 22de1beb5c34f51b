"""Exact resume: a training process killed with SIGKILL, at steps and during async saves, then
resumed, ends with the same ``tree_digest`` as a run never interrupted.

Set ``FXTRAIN_E2E_KILLS=N`` for N random kill points instead of the CI set.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = r'''
import os, signal, sys, time
import torch
from torch import nn
import torch.nn.functional as F
import fxtrain as fx

torch.set_num_threads(1)
workdir, kill_at, kill_in = sys.argv[1], int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
x = torch.randn(320, 12, generator=g)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3))
schedule = fx.optim.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=5, decay_steps=60)
tx = fx.optim.adamw(schedule, weight_decay=0.01)
in_step = [fx.callbacks.ema(0.9), fx.callbacks.grad_monitor(4)]
host = [fx.callbacks.early_stopping("loss", patience=20, restore_best=True),
        fx.callbacks.checkpoint_policy(every=6)]


def loss_fn(state, params, batch):
    xb, yb = batch
    logits = state.apply(params, xb)
    return F.cross_entropy(logits, yb), {"accuracy": (logits.argmax(-1) == yb).float().mean()}


def killer(state, event):
    if event.step == kill_at and event.kind == kill_in:
        os.kill(os.getpid(), signal.SIGKILL)  # "checkpoint": the async save is in flight
    if event.kind == "step_end":
        time.sleep(0.01)  # a step of realistic length, so async saves finish between kills


state = fx.TrainState.create(model, tx, seed=1, callbacks=in_step)
step = fx.make_train_step(loss_fn, callbacks=in_step)
with fx.checkpoint.CheckpointManager(workdir + "/ckpt", keep_latest=2) as manager:
    end = fx.fit(state, step, fx.data.Batches((x, y), 32, shuffle=True, seed=2), max_steps=40,
                 callbacks=host + [killer], checkpoint=manager, eval_step=fx.make_eval_step(loss_fn),
                 eval_data=[(x[:96], y[:96])], eval_every=5)
print("digest", fx.tree_digest(end), flush=True)
'''


def train(tmp_path: Path, workdir: Path, kill_at: int = -1, kill_in: str = "step_end"):
    script = tmp_path / "train.py"
    if not script.exists():
        script.write_text(TRAIN)
    return subprocess.run([sys.executable, str(script), str(workdir), str(kill_at), kill_in],
                          capture_output=True, text=True, timeout=300)


def digest_of(out) -> str:
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("digest"))


# (step, event): before the first checkpoint, between checkpoints, during async saves (the
# "checkpoint" event comes right after the manager hands the write to its thread), at an epoch
# boundary (10 steps per epoch) and near the end
CI_KILLS = [(3, "step_end"), (6, "checkpoint"), (11, "step_end"), (24, "checkpoint"),
            (30, "step_end"), (37, "step_end")]


def kill_points():
    n = int(os.environ.get("FXTRAIN_E2E_KILLS", "0"))
    if not n:
        return CI_KILLS
    rng = random.Random(n)
    return [(rng.randrange(1, 40), "step_end") if i % 3 else
            (rng.choice(range(6, 40, 6)), "checkpoint") for i in range(n)]


@pytest.mark.slow
def test_killed_and_resumed_runs_end_bit_identical(tmp_path):
    """One run killed at every kill point in turn, each resumed run killed at the next point,
    then resumed to the end: the uninterrupted run's digest. Every point is a kill, and every
    resume but the last is killed again (a run killed once, or twice, is a prefix of this one);
    one process per kill point, where a kill and a resume each cost two."""
    whole = digest_of(train(tmp_path, tmp_path / "whole"))
    # in the order a run meets them: a step's step_end comes before its checkpoint
    points = sorted(set(kill_points()), key=lambda p: (p[0], p[1] != "step_end"))
    workdir, resumed_from = tmp_path / "run", 0
    for kill_at, kill_in in points:
        killed = train(tmp_path, workdir, kill_at, kill_in)
        assert killed.returncode == -signal.SIGKILL, (
            f"not killed at {kill_at} ({kill_in})\n" + killed.stdout[-2000:]
            + killed.stderr[-3000:])
        resumed_from += "resuming from the checkpoint" in killed.stdout
    resumed = train(tmp_path, workdir)
    resumed_from += "resuming from the checkpoint" in resumed.stdout
    assert digest_of(resumed) == whole, f"killed at {points} in turn"
    assert resumed_from >= len(points) // 2  # most kills came after a finished checkpoint
