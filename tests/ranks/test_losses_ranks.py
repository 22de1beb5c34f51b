"""test_losses's tests that run several ranks (the rest: tests/unit/test_losses.py)."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
import dist_worker
import fxtrain as fx
from dist_worker import lm_batches, lm_loss, lm_model
from helpers import TRACED, once_per_run
from helpers_distributed import results, spawn
from helpers_losses import ATOL


PATHS = [(False, "func"), (True, "func"), (True, "autograd")]


@pytest.fixture(scope="module")
def loss_jobs(tmp_path_factory):
    """The 2-rank runs of the test below, one per gradient path, in one launch
    (``dist_worker.several``), each writing into its own folder ("False-func", ...), and one
    process's on the global batch ("single"). Once per run."""
    def make(out):
        jobs = [("lm_weighted", (str(out / f"{c}-{a}"),), {"compiled": c, "autodiff": a})
                for c, a in PATHS]
        for _, (folder,), _ in jobs:
            os.mkdir(folder)
        spawn("several", jobs)
        (out / "single").mkdir()
        dist_worker.lm_weighted(str(out / "single"))  # this process: world size 1

    return once_per_run(tmp_path_factory, "loss_jobs", make)


@pytest.mark.slow
@pytest.mark.parametrize("compiled,autodiff", PATHS)
def test_two_ranks_weigh_tokens_as_one_process_with_the_global_batch(loss_jobs, compiled,
                                                                     autodiff):
    """Each rank holds other token counts; the ranks' update and logged loss are those of one
    process on the global batch, on every gradient path."""
    r0, r1 = results(loss_jobs / f"{compiled}-{autodiff}")
    single = torch.load(loss_jobs / "single" / "rank0.pt")
    for k, p in single["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=0, atol=ATOL)
        torch.testing.assert_close(r1["params"][k], r0["params"][k], rtol=0, atol=0)
    for ranks, one in zip(r0["metrics"], single["metrics"]):
        assert ranks["loss_count"] == one["loss_count"]  # the global count, on every rank
        assert ranks["loss"] == pytest.approx(one["loss"], rel=1e-5)
