"""benchmarks/simulate.py at a tiny size: each layout, fx.shard and FSDP2, a row of the table."""

import json
import sys

from helpers import BENCHMARKS, imported


def test_simulate_benchmark_smoke(tmp_path):
    simulate = imported("simulate")
    sys.path.insert(0, str(BENCHMARKS))  # the spawned process imports the script by name
    try:
        result = simulate.main(["--smoke", "--out", str(tmp_path / "simulate")])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert [(r["layout"], r["world"]) for r in result["rows"]] == [("fsdp", 8), ("fsdp_tp", 16)]
    for row in result["rows"]:
        fx, fsdp2 = row["fxtrain"], row["fsdp2"]
        # each entry is its own run's (--smoke runs them in a process per variant)
        for variant, run in (("fxtrain", fx), ("fsdp2", fsdp2)):
            assert (run["layout"], run["world"], run["variant"]) == (row["layout"],
                                                                     row["world"], variant)
        for key in ("params_bytes", "all_gather_bytes", "reduce_scatter_bytes"):
            assert fx[key] == fsdp2[key] > 0  # the same shards, gathered and reduced alike
        assert fx["peak_bytes"] > fx["held_bytes"] > fx["params_bytes"]
    text = (tmp_path / "simulate.md").read_text()
    assert "| tiny | FSDP | 8 |" in text and "| tiny | FSDP x TP 2x8 | 16 |" in text
    assert json.loads((tmp_path / "simulate.json").read_text())["rows"] == result["rows"]


def test_bad_runs_are_refused_by_name(capsys):
    """Issue 75: ``--runs tiny:fsdpp:8`` simulated FSDP x TP and labelled it so (any layout
    but "fsdp" was taken for it); other bad arguments were tracebacks."""
    import pytest
    simulate = imported("simulate")
    for argv, message in [
            (["--runs", "tiny:fsdpp:8"], "layout must be fsdp, fsdp_tp, fsdp_cp<C> or "
                                         "fsdp_tp_cp<C> (C context-parallel ranks), each "
                                         "optionally ending _remat (every layer recomputed), "
                                         "got 'fsdpp'"),
            (["--runs", "tiny:fsdp_cp:8"], "got 'fsdp_cp'"),
            (["--runs", "tiny:fsdp_tp_cp4:16"], "fsdp_tp_cp4 takes a multiple of 32 ranks"),
            (["--runs", "tiny:fsdp"], "--runs takes model:layout:ranks"),
            (["--runs", "big:fsdp:8"], "model must be one of llama3-8b, llama3-70b, tiny"),
            (["--runs", "tiny:fsdp_tp:12"], "fsdp_tp takes a multiple of 8 ranks"),
            (["--runs", "tiny:fsdp:0"], "ranks must be a positive int, got '0'"),
            (["--seq", "0"], "--seq must be at least 1, got 0")]:
        with pytest.raises(SystemExit) as exit:
            simulate._arguments(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv
    assert simulate._arguments(["--runs", "tiny:fsdp_tp:16"]).parsed == [("tiny", "fsdp_tp", 16)]
    assert simulate._described("fsdp_tp_cp4", 256) == "FSDP x CP x TP 8x4x8"
    assert simulate._described("fsdp_cp8", 8) == "FSDP x CP 1x8"
    assert simulate._described("fsdp_cp8_remat", 8) == "FSDP x CP 1x8, each layer recomputed"
    assert simulate._arguments(["--runs", "tiny:fsdp_remat:2"]).parsed == \
        [("tiny", "fsdp_remat", 2)]
