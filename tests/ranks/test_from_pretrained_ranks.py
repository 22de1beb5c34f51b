"""fx.from_pretrained on several ranks: a folder saved by save_pretrained loaded straight into
each layout equals, bit for bit on every rank, the whole-model path (transformers'
from_pretrained, TrainState.create, fx.shard), and trains the same 5 steps; a fault one rank
meets raises on all (the one-process tests: tests/unit/test_from_pretrained.py)."""

import json

import pytest
import torch.multiprocessing as mp

import dist_worker
import pretrained_worker
from helpers import extra, once_per_run
from helpers_distributed import free_port

transformers = extra("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return once_per_run(tmp_path_factory, "pretrained_models", pretrained_worker.save_models)


def _launch(out, world, name, *args):
    mp.spawn(dist_worker.spawned, nprocs=world,
             args=(world, free_port(), name, (str(out), *args), {}))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


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


TWO = [(m, layout) for m in ("llama", "llama_tied") for layout in ("units", "whole", "tp")] \
    + [("gpt2", "units"), ("gpt2", "whole")]
FOUR = [("llama", "fsdp_tp"), ("llama_tied", "fsdp_tp"), ("llama_tied", "hsdp"),
        ("gpt2", "hsdp"), ("llama", "units")]


@pytest.mark.slow
@pytest.mark.parametrize("world,cases", [(2, TWO), (4, FOUR)], ids=["2ranks", "4ranks"])
def test_loaded_straight_into_shards_equals_the_whole_model_path(saved, tmp_path, world,
                                                                 cases):
    """Llama (untied, tied; a vocabulary of 37, split unevenly) and GPT-2 (tied, Conv1D),
    saved in several files with an index: per block, whole, a tensor-parallel plan on 2 ranks;
    FSDP x TP and HSDP on 2 x 2, and per block on 4. On every rank the parameters (placements,
    local shards), buffers (rotary tables), optimizer state, step and key are those of the
    whole-model path bit for bit, the layout's facts too, and 5 AdamW steps give the same
    losses and the same state (the same code on the same values)."""
    from fxtrain._torch.version import at_least
    if not at_least(2, 13):
        cases = [c for c in cases if c[1] != "units"]
    ranks = _launch(tmp_path, world, pretrained_worker.compared, str(saved), cases)
    _check(ranks, cases)


@pytest.mark.slow
def test_a_fault_one_rank_meets_raises_on_every_rank(saved, tmp_path):
    """Rank 1's copy of the folder is cut short by one byte: both ranks raise, rank 1 naming
    the truncated file (rank 0 gets rank 1's error), instead of rank 0 waiting."""
    ranks = _launch(tmp_path, 2, pretrained_worker.damaged_on_one_rank, str(saved))
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
def test_a_sharded_run_exported_loads_back_in_another_layout(saved, tmp_path):
    """The round trip: the tied Llama loaded per block on 2 ranks, trained 3 steps and saved
    sharded; exported by fx.export_pretrained in this process (no group); loaded by
    fx.from_pretrained on 2 ranks under a tensor-parallel plan: the trained parameters, bit for
    bit; transformers' own from_pretrained loads the export with no name missing or extra."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trained = _launch(tmp_path / "a", 2, pretrained_worker.trained_and_saved, str(saved),
                      str(tmp_path / "ckpt"))
    import fxtrain as fx
    folder = fx.export_pretrained(tmp_path / "ckpt", tmp_path / "hf")
    _, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    loaded = _launch(tmp_path / "b", 2, pretrained_worker.loaded_digest, str(folder), "tp")
    assert trained[0]["digest"] == trained[1]["digest"]
    for rank in loaded:
        assert rank["planned"] and rank["digest"] == trained[0]["digest"], (rank, trained)
