"""test_losses's tests that run several ranks (the rest: tests/unit/test_losses.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
import dist_worker
import fxtrain as fx
from dist_worker import lm_batches, lm_loss, lm_model
from helpers import TRACED
from test_distributed import results, spawn
from test_losses import (ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("compiled,autodiff", [(False, "func"), (True, "func"),
                                               (True, "autograd")])
def test_two_ranks_weigh_tokens_as_one_process_with_the_global_batch(tmp_path, compiled,
                                                                     autodiff):
    """Each rank holds other token counts; the ranks' update and logged loss are those of one
    process on the global batch, on every gradient path."""
    spawn("lm_weighted", str(tmp_path), compiled=compiled, autodiff=autodiff)
    r0, r1 = results(tmp_path)
    (tmp_path / "single").mkdir()
    dist_worker.lm_weighted(str(tmp_path / "single"))  # this process: world size 1
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for k, p in single["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=0, atol=ATOL)
        torch.testing.assert_close(r1["params"][k], r0["params"][k], rtol=0, atol=0)
    for ranks, one in zip(r0["metrics"], single["metrics"]):
        assert ranks["loss_count"] == one["loss_count"]  # the global count, on every rank
        assert ranks["loss"] == pytest.approx(one["loss"], rel=1e-5)
