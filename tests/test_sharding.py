"""A sharded TrainState (fx.shard: DTensors on a DeviceMesh, FSDP-style) on 2 CPU processes
(gloo); the scenarios are in tests/dist_worker.py."""

import pytest
import torch

import fxtrain as fx
import dist_worker
from test_distributed import results, spawn

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sharded_training_equals_one_process_with_the_global_batch(tmp_path, compiled):
    spawn("sharded", str(tmp_path), compiled=compiled, batch=16)
    r0, r1 = results(tmp_path)
    assert r0["sharded"] and r0["digest"] == r1["digest"]  # the ranks agree bit for bit
    if compiled:
        assert r0["graphs"] == 1  # gather, reduce-scatter and optimizer in the one graph
    (tmp_path / "single").mkdir()
    dist_worker.sharded(str(tmp_path / "single"), batch=32)  # this process: world size 1
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert not single["sharded"]
    for k, p in single["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-5, atol=1e-6)
    # grad_norm (a norm over the shards, reduced over the ranks) is the whole gradient's
    torch.testing.assert_close(r0["grad_norms"], single["grad_norms"], rtol=1e-5, atol=1e-6)


def test_each_rank_holds_about_half_the_parameters_and_optimizer_state(tmp_path):
    spawn("sharded", str(tmp_path), steps=2)
    for r in results(tmp_path):
        held = sum(r["local"])
        assert 0.45 * r["whole"] <= held <= 0.6 * r["whole"], (held, r["whole"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_sharding_composes_with_mixed_precision_as_data_parallel_does(tmp_path, precision):
    (tmp_path / "sharded").mkdir()
    (tmp_path / "replicated").mkdir()
    spawn("sharded", str(tmp_path / "sharded"), precision=precision)
    spawn("sharded", str(tmp_path / "replicated"), precision=precision,
          shard=False)
    sharded, replicated = results(tmp_path / "sharded")[0], results(tmp_path / "replicated")[0]
    assert sharded["sharded"] and not replicated["sharded"]
    for k, p in replicated["params"].items():
        torch.testing.assert_close(sharded["params"][k], p, rtol=1e-4, atol=1e-5)
