"""Data parallel training on torch.distributed: 2 CPU processes (gloo), started with
torch.multiprocessing or torchrun; the scenarios are in tests/dist_worker.py."""

import contextlib
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxtrain as fx
import dist_worker
from helpers import mlp, reaped


# ---- sharded data (no processes needed) ------------------------------------------------------

def test_batches_shard_the_global_batch_across_ranks():
    x = torch.arange(100)
    single = fx.data.Batches(x, 20, seed=4)
    ranks = [fx.data.Batches(x, 10, seed=4, shard=(r, 2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    pos = [single.init(), ranks[0].init(), ranks[1].init()]
    for _ in range(12):  # across epochs
        (whole, pos[0], _), (a, pos[1], _), (b, pos[2], _) = (
            s.next(p) for s, p in zip([single, *ranks], pos))
        assert torch.equal(torch.cat([a, b]), whole)  # rank 0 the first half, rank 1 the second


def test_sharded_eval_batches_cover_every_example_once():
    x = torch.arange(45)
    parts = [torch.cat(list(fx.data.Batches(x, 10, shuffle=False, drop_last=False,
                                            shard=(r, 2)))) for r in (0, 1)]
    assert sorted(torch.cat(parts).tolist()) == list(range(45))
    with pytest.raises(ValueError, match="shard must be \\(rank, world_size\\)"):
        fx.data.Batches(x, 10, shard=(2, 2))
    with pytest.raises(ValueError, match="make no batch of 30 on each of 2 ranks"):
        fx.data.Batches(x, 30, shard=(0, 2))


def test_evaluation_merged_across_ranks_weighs_each_rank_by_its_examples(monkeypatch):
    """Two ranks with unequal shares (70 and 30 examples), the gather faked in one process:
    the merged metrics are those of all 100 examples, as if one process had evaluated them."""
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    X, Y = dist_worker.X[:100], dist_worker.Y[:100]

    def metrics(s, b):
        logits = s.apply(s.params, b[0])
        return {"loss": F.cross_entropy(logits, b[1]),
                "acc": fx.metrics.Accuracy.from_model_output(logits=logits, labels=b[1])}

    eval_step = fx.make_eval_step(metrics)
    whole, rank0, rank1 = (list(fx.data.Batches((X[lo:hi], Y[lo:hi]), 16, shuffle=False,
                                                drop_last=False))
                           for lo, hi in [(0, 100), (0, 70), (70, 100)])
    whole = fx.evaluate(eval_step, state, whole)
    sent = []
    monkeypatch.setattr(fx.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fx.distributed, "all_gather", lambda obj: sent.append(obj) or [obj])
    fx.evaluate(eval_step, state, rank1)  # rank 1: what it sends
    monkeypatch.setattr(fx.distributed, "all_gather", lambda obj: [obj, sent[0]])
    merged = fx.evaluate(eval_step, state, rank0)  # rank 0, gathering both
    assert merged.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(merged[k], whole[k], rtol=1e-6, atol=1e-7)


def test_data_parallel_needs_a_process_group():
    with pytest.raises(ValueError, match="needs an initialized process group"):
        fx.make_train_step(dist_worker.loss_fn, data_parallel=True)
    with pytest.raises(ValueError, match="buffers must be 'mean' or 'local'"):
        fx.make_train_step(dist_worker.loss_fn, buffers="sum")


# ---- two processes ----------------------------------------------------------------------------
