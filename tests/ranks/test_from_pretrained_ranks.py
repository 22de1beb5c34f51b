"""fx.from_pretrained on several ranks: a folder saved by save_pretrained loaded straight into
each layout equals, bit for bit on every rank, the whole-model path (transformers'
from_pretrained, TrainState.create, fx.shard), and trains the same 5 steps; a fault one rank
meets raises on all (the one-process tests: tests/unit/test_from_pretrained.py)."""

import json

import pytest
import torch.multiprocessing as mp

import dist_worker
import pretrained_worker
from helpers import extra
from helpers_distributed import free_port
from helpers_pretrained import loaded_cases

transformers = extra("transformers")


def _reports(out, world):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _launch(out, world, name, *args):
    mp.spawn(dist_worker.spawned, nprocs=world,
             args=(world, free_port(), name, (str(out), *args), {}))
    return _reports(out, world)


def _check(ranks, cases):
    for rank, report in enumerate(ranks):
        for model, layout in cases:
            got = report[f"{model}/{layout}"]
            where = f"rank {rank}, {model} {layout}"
            assert got["loaded"] == dict.fromkeys(got["loaded"], True), (where, got["loaded"])
            assert all(got["layout"]), (where, got["layout"])
            whole, loaded = got["losses"]
            assert len(whole) == 5 and whole == loaded, (where, whole, loaded)
            assert got["trained"], where
            assert got["sharded"] > 0, where
    # the layouts are the ones asked for: per block, whole, a plan
    report = ranks[0]
    for model, layout in cases:
        got = report[f"{model}/{layout}"]
        if layout in ("units",):
            assert len(got["units"]) == 2, got
        if layout == "whole":
            assert got["units"] == [], got
        if layout in ("tp", "fsdp_tp"):
            assert got["planned"], got


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4], ids=["2ranks", "4ranks"])
def test_loaded_straight_into_shards_equals_the_whole_model_path(pretrained_jobs, world):
    """Llama (untied, tied; a vocabulary of 37, split unevenly) and GPT-2 (tied, Conv1D),
    saved in several files with an index: per block, whole, a tensor-parallel plan on 2 ranks;
    FSDP x TP and HSDP on 2 x 2, and per block on 4. On every rank the parameters (placements,
    local shards), buffers (rotary tables), optimizer state, step and key are those of the
    whole-model path bit for bit, the layout's facts too, and 5 AdamW steps give the same
    losses and the same state (the same code on the same values). The layouts:
    helpers_pretrained.LOADED, run in the launch ``pretrained_jobs`` shares."""
    _check(_reports(pretrained_jobs / f"loaded{world}", world), loaded_cases(world))


@pytest.mark.slow
def test_a_fault_one_rank_meets_raises_on_every_rank(pretrained_jobs):
    """Rank 1's copy of the folder is cut short by one byte: both ranks raise, rank 1 naming
    the truncated file (rank 0 gets rank 1's error), instead of rank 0 waiting."""
    ranks = _reports(pretrained_jobs / "fault2", 2)
    for report in ranks:
        assert report["error"] is not None and "DamagedCheckpointError" in report["error"]
        assert "cut short" in report["error"] and "copy1" in report["error"], report


@pytest.mark.slow
def test_a_ranks_peak_memory_while_loading_is_its_shard_and_no_whole_copy(monkeypatch):
    """Measured, not computed (benchmarks/load_pretrained.py, on a 2-layer Llama of 86 MB
    whose largest tensor is 33 MB): each rank's peak anonymous resident memory while
    fx.from_pretrained loads is at most what its state then holds plus the largest tensor
    plus 16 MiB; the whole-model path, on the same ranks, exceeds that bound (the test can
    fail: a whole copy anywhere in the load would show)."""
    from helpers import BENCHMARKS, imported
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the ranks unpickle its entry point
    bench = imported("load_pretrained")
    args = bench._arguments(["--layers", "2", "--hidden", "512", "--intermediate", "1024",
                             "--heads", "8", "--vocab", "16000"])
    result = bench.run(args)
    print(bench.report(result))
    bound = result["largest"] + result["bound"]
    for r in result["ranks"]["fx"]:
        assert r["peak"] <= r["held"] + bound, result
    for r in result["ranks"]["whole"]:
        assert r["peak"] > r["held"] + bound, result
    assert result["ratio"] > 2, result


@pytest.mark.slow
def test_a_sharded_run_exported_loads_back_in_another_layout(pretrained_jobs, tmp_path):
    """The round trip: the tied Llama loaded per block on 2 ranks, trained 3 steps and saved
    sharded; exported by fx.export_pretrained in this process (no group); loaded by
    fx.from_pretrained on 2 ranks under a tensor-parallel plan: the trained parameters, bit for
    bit; transformers' own from_pretrained loads the export with no name missing or extra."""
    (tmp_path / "b").mkdir()
    trained = _reports(pretrained_jobs / "export2", 2)  # in the launch pretrained_jobs shares
    import fxtrain as fx
    folder = fx.export_pretrained(pretrained_jobs / "export_ckpt", tmp_path / "hf")
    _, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    loaded = _launch(tmp_path / "b", 2, pretrained_worker.loaded_digest, str(folder), "tp")
    assert trained[0]["digest"] == trained[1]["digest"]
    for rank in loaded:
        assert rank["planned"] and rank["digest"] == trained[0]["digest"], (rank, trained)
