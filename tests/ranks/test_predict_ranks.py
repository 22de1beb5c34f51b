"""test_predict's tests that run several ranks (the rest: tests/unit/test_predict.py)."""

import pytest
import torch
import torch.nn.functional as F
import dist_worker
import fxtrain as fx
from helpers import mlp
from helpers_distributed import results, spawn


@pytest.mark.slow
def test_two_processes_each_get_every_prediction_in_order(tmp_path):
    spawn("predicting", str(tmp_path))
    r0, r1 = results(tmp_path)
    state = fx.TrainState.create(mlp(sizes=(8, 16, 4)), fx.optim.sgd(0.1))
    expected = state.apply(r0["params"], dist_worker.X[:45])
    for r in (r0, r1):
        torch.testing.assert_close(r["out"]["logits"], expected)
        assert torch.equal(r["out"]["row"], dist_worker.X[:45, 0])
