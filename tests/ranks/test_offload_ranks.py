"""fx.shard(offload="optimizer") on gloo ranks: a Llama loaded by fx.from_pretrained trains 10
steps with its optimizer state on the host to the same bits as without it, eager (the fused
AdamW on the local shards, and a clipped chain through DTensor) and compiled (one graph), per
block, whole and under a tensor-parallel plan; its checkpoints restore with and without the
offload, and resume exactly (the one-process checks: tests/unit/test_offload.py)."""

import json

import pytest

import offload_worker
from helpers import extra
from helpers_pretrained import OFFLOADED

transformers = extra("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4], ids=["2ranks", "4ranks"])
def test_offloaded_optimizer_state_trains_to_the_same_bits(pretrained_jobs, world):
    """The cases of helpers_pretrained.OFFLOADED, run in the launch ``pretrained_jobs``
    shares."""
    cases = OFFLOADED[world]
    for rank in range(world):
        report = json.loads((pretrained_jobs / f"offloaded{world}" / f"rank{rank}.json")
                            .read_text())
        assert len(report) == len(cases)
        for key, got in report.items():
            where = f"rank {rank}, {key}"
            assert got["start"], where
            plain, offloaded = got["losses"]
            assert len(plain) == offload_worker.STEPS and plain == offloaded, (where, got)
            assert got["params"] and got["opt_state"], (where, got)
            assert got["layout"] == [None, "optimizer"], where
            # every optimizer leaf on the host, before and after training; the AdamW moments
            # alone are twice the parameters' bytes
            assert got["devices"] == ["cpu"] == got["trained_devices"], (where, got)
            assert got["host_bytes"] >= 2 * got["params_bytes"] > 0, (where, got)
            for like, (layout_kept, devices, exact) in got["resumed"].items():
                assert layout_kept and devices == ["cpu"], (where, like, got["resumed"])
                assert exact, (where, like, "resumed run differs")


@pytest.mark.slow
def test_the_offloaded_moments_are_measured_in_the_hosts_resident_set(monkeypatch):
    """benchmarks/offload.py on a 2-layer Llama whose tensors are above glibc's mapping
    threshold (each its own mapping, counted while held): on each rank, the offloaded run's
    host RssAnon after the load holds its optimizer state (AdamW's moments, measured, not
    computed), and its steps give the bits of the run without offload."""
    from helpers import BENCHMARKS, imported
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the ranks unpickle its entry point
    bench = imported("offload")
    args = bench._arguments(["--layers", "2", "--hidden", "256", "--intermediate", "512",
                             "--heads", "4", "--vocab", "4000", "--steps", "3"])
    result = bench.run(args)
    print(bench.report(result))
    assert result["same"], result
    for rank in result["summary"]:
        row = rank["optimizer"]
        assert row["moments"] > 0 and row["host"] >= 0.9 * row["moments"], result
