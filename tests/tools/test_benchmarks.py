"""Smoke runs of benchmarks/ (tiny sizes, a few steps): every script works, every variant and
every row of the report is there. The full runs are `benchmarks/run_all.py`, never run here.

The smoke runs themselves are marked ``extended``: they run our own scripts end to end and guard
no promise to users, so the README's command and CI leave them out (about a third of the
suite's CPU on a 2-core machine); `bash scripts/test.sh --extended` runs them, after a change to
benchmarks/ or to what a benchmark calls. The tests of the report's arithmetic stay in."""

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import BENCHMARKS, imported

ROOT = Path(__file__).resolve().parents[2]


def files_under(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but Python's bytecode caches, with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="session")
def run_all(tmp_path_factory):
    """``run_all.py --smoke --out <tmp>`` once for the tests below: (record, out folder).

    Once per test run: under pytest-xdist these tests may land on both workers, so the first
    worker runs it under a lock in the run's shared temporary folder and the other reads its
    ``results.json`` (a second smoke run cost 5 minutes)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's
    out = shared / "bench"
    with FileLock(str(shared / "bench.lock")):
        if (out / "results.json").is_file():
            return json.loads((out / "results.json").read_text()), out
        out.mkdir()
        before = files_under(BENCHMARKS)
        imported("run_all").main(["--smoke", "--out", str(out)])
        assert files_under(BENCHMARKS) == before, "run_all --smoke --out wrote into benchmarks/"
        return json.loads((out / "results.json").read_text()), out


def results_of(record, name):
    bench = record["benchmarks"][name]
    assert "failed" not in bench, bench.get("failed")
    return bench["results"]


@pytest.mark.extended
def test_peers_benchmark_smoke(run_all):
    peers = imported("peers")
    results = results_of(run_all[0], "peers")
    assert set(results) == {"tiny"}
    assert set(results["tiny"]) == set(peers.VARIANTS)
    assert all(m["steps_per_sec"] > 0 and m["cpu_use"] > 0 for m in results["tiny"].values())


def test_one_core_gives_the_threads_and_cpus_back():
    peers = imported("peers")
    threads, env = torch.get_num_threads(), dict(os.environ)
    with peers.one_core():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads and dict(os.environ) == env


@pytest.mark.extended
def test_compile_time_benchmark_smoke(run_all):
    bench = imported("compile_time")
    summary = results_of(run_all[0], "compile_time")["summary"]
    assert set(summary) == set(bench.SMOKE)
    fxtrain = summary["fxtrain"]
    assert fxtrain["cold"]["graphs"] == 1 and not fxtrain["cold"]["recompiled"]
    assert fxtrain["warm"]["first_step_s"] < fxtrain["cold"]["first_step_s"]
    loaded = summary["fxtrain_precompiled"]["warm"]  # fx.precompiled's file: nothing traced
    from fxtrain._torch.version import at_least
    assert loaded["graphs"] == (0 if at_least(2, 13) else 1)  # before 2.13: torch.compile's
    assert summary["fxtrain_precompiled"]["cold"]["graphs"] == 1
    eager = summary["fxtrain_eager"]["cold"]
    assert eager["graphs"] == 0 and eager["step_s"] > 0  # the uncompiled step compiles nothing
    found = results_of(run_all[0], "compile_time")["break_even"]["mlp"]
    assert set(found) == {"cold", "warm"}
    for mode, row in found.items():  # the run length where both ways take the same time
        if row["steps"] is not None:
            n = row["steps"]
            compiled = row["compiled_first_s"] + (n - 1) * row["compiled_step_s"]
            eager_run = row["eager_first_s"] + (n - 1) * row["eager_step_s"]
            assert compiled <= eager_run + 1e-9, (mode, row)
            assert row["eager_run_s"] == pytest.approx(eager_run)


def test_break_even_is_where_the_compiled_run_catches_up():
    bench = imported("compile_time")
    row = lambda first, step: {"first_step_s": first, "step_s": step}  # noqa: E731
    summary = {"fxtrain": {"cold": row(10.0, 0.001), "warm": row(2.0, 0.001)},
               "fxtrain_eager": {"cold": row(0.01, 0.003)}}
    found = bench.break_even(summary)
    # 10 + (n - 1) * 0.001 <= 0.01 + (n - 1) * 0.003 from n - 1 = 4995
    assert found["cold"]["steps"] == 4996 and found["warm"]["steps"] == 996
    summary["fxtrain_eager"]["cold"]["step_s"] = 0.001  # not faster compiled: never pays
    assert bench.break_even(summary)["cold"]["steps"] is None
    assert "never" in bench.break_even_table({"mlp": bench.break_even(summary)})



def test_warm_against_cold_is_each_variants_own_ratio_for_every_kind():
    """Issue 62's table: a variant measured cold and warm, its warm first step over its cold
    one (wall and CPU), for each model of --kinds; a variant measured cold only has no row."""
    bench = imported("compile_time")
    row = lambda wall, cpu: {"first_step_s": wall, "first_step_cpu_s": cpu}  # noqa: E731
    assert bench.warm_cold(row(40.0, 20.0), row(4.0, 5.0)) == {"warm_vs_cold": 0.1,
                                                               "cpu_warm_vs_cold": 0.25}
    text = bench.warm_cold_table({
        "gpt2": {"fxtrain_precompiled": {"cold": row(40.0, 20.0), "warm": row(4.0, 5.0)}},
        "mlp": {"fxtrain_precompiled": {"cold": row(10.0, 8.0), "warm": row(5.0, 2.0)},
                "fxtrain_eager": {"cold": row(0.1, 0.1)}}})
    rows = text.splitlines()[1:]
    assert [r.split()[:2] for r in rows] == [["gpt2", "fxtrain_precompiled"],
                                             ["mlp", "fxtrain_precompiled"]]
    assert rows[0].split()[-4:] == ["0.10x", "20.0s", "5.0s", "0.25x"]
    args = bench.arguments(["--kinds", "gpt2", "mlp", "--each-kind"])
    assert args.each_kind and args.kinds == ["gpt2", "mlp"]

@pytest.mark.extended
def test_step_overhead_benchmark_smoke(run_all):
    results = results_of(run_all[0], "step_overhead")
    timed = set(imported("step_overhead").VARIANTS) | {"e_bare_loop"}
    tiny = results["tiny"]
    assert set(tiny) == timed | {"f_fit", "g_fit_host_callbacks", "h_fit_logging"}, tiny
    assert all(math.isfinite(rate) for rate in tiny.values()), tiny
    # f-h are differences of two timed runs (so fit's start-up cancels), which a smoke run's
    # few steps beside another benchmark can make negative; the rows timed directly cannot be
    assert all(tiny[name] > 0 for name in timed), tiny


@pytest.mark.extended
def test_checkpoint_benchmark_smoke(run_all):
    (times,) = results_of(run_all[0], "checkpoint").values()
    assert times and all(t > 0 for t in times.values())


@pytest.mark.extended
def test_distributed_benchmark_smoke(run_all):
    results = results_of(run_all[0], "distributed")["tiny"]
    variants = ("fxtrain_sharded", "ddp_eager", "ddp_compiled")
    assert set(results) == {"1", "2", "efficiency", "state_memory", "save_bytes", *variants}
    for row in (results, *(results[v] for v in variants)):
        assert all(row[k] > 0 for k in ("1", "2", "efficiency"))
    assert results["fxtrain_sharded"]["1"] == results["1"]  # no group to shard over in one
    memory = results["state_memory"]
    assert memory["replicated_2"] == memory["unsharded_1"]  # DP holds the whole state
    assert memory["ratio"] == memory["sharded_2"] / memory["unsharded_1"] <= memory["target"]
    save = results["save_bytes"]
    assert save["ratio"] == save["sharded_2"] / save["full_1"] and save["sharded_2"] > 0


@pytest.mark.extended
def test_memory_benchmark_smoke(run_all):
    results = results_of(run_all[0], "memory")
    assert set(results["rows"]) == set(imported("memory").VARIANTS) - {"fx_graphs"}  # GPU only
    for row in results["rows"].values():
        assert all(run["peak_bytes"] > 0 and run["params"] > 0 for run in row["runs"])


@pytest.mark.extended
def test_run_all_writes_every_section_and_row(run_all):
    record, out = run_all
    assert set(record["benchmarks"]) == set(imported("run_all").BENCHMARKS)
    text = (out / "RESULTS.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "did not produce results" not in text
    report = imported("report")
    for section in ("fxtrain against its peers", "Step overhead", "Host loop and callbacks",
                    "Logging callbacks", "Checkpoints", "Data parallel scaling",
                    "Memory per trained parameter", "Compile time", "A GPT-2 transformer",
                    "Scale: activation checkpointing and per-block sharding", "On a GPU"):
        assert f"## {section}" in text
    not_run = results_of(record, "scale")["not_run"]  # before torch 2.13: named as not run
    for variant in imported("scale").SMOKE:  # the smoke's variants (a full run's: report.SCALE)
        label = report.SCALE[variant]
        assert (f"Not run: `{variant}`" if variant in not_run else f"| {label} |") in text
    cpu_memory = [label for v, label in report.MEMORY.items() if v != "fx_graphs"]  # GPU only
    for label in [*report.PEERS.values(), *cpu_memory, *report.TRANSFORMER.values()]:
        assert f"| {label} |" in text
    assert "Targets (start-up issue): cold compile at most 1.0x the baseline" in text
    assert "1.1x the baseline's warm process, whichever is larger: not measured" in text  # smoke
    for row in ("| tiny MLP 64-64-10 (batch 32) | 1.00x", "| (e) bare Python loop",
                "| (g) `fx.fit`", "| 1 MB |", "| tiny MLP 64-64-10 (batch per rank 32) |",
                "| torch DDP, compiled model |", "| fxtrain sharded (`fx.shard`) |",
                "| bytes per rank, sharded on 2 |"):
        assert row in text
    for target in ("2.5x a plain eager loop", ">= 3x Lightning", "ahead of Ignite",
                   "JAX + optax against fxtrain", "(g) at most 5%", "at most 5% over (f)",
                   "fx_async_blocking at 1 MB", ">= 1.0x the compiled loop's tokens/s",
                   "at most 1.1x the compiled loop's memory per parameter",
                   "loss curve within noise of float32's", "| float32, other order |"):
        assert target in text
    assert "torch " in text and "pytorch-lightning " in text and "jax " in text
    assert "](results.png)" in text
    if not report.GPU_TRANSFORMER.exists():
        assert "MFU): **not measured**" in text


@pytest.mark.extended
def test_report_is_rewritten_from_the_saved_results(run_all, tmp_path):
    record, out = run_all
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    imported("run_all").main(["--report-only", "--out", str(tmp_path)])
    assert (tmp_path / "RESULTS.md").read_text() == (out / "RESULTS.md").read_text()
    assert (tmp_path / "results.png").exists()


@pytest.mark.extended
def test_transformer_benchmark_smoke(run_all):
    """Every variant at both depths (the first run in a process of its own, as every run of a
    full benchmark); the slopes; bf16-mixed's loss curve against float32's and against the noise
    floor (float32 in another order)."""
    results = results_of(run_all[0], "transformer")
    assert set(results["rows"]) == set(imported("transformer").VARIANTS)
    for row in results["rows"].values():
        assert [run["layers"] for run in row["runs"]] == results["depths"]
        for run in row["runs"]:
            assert run["tokens_per_s"] > 0 and run["params"] > 0
            assert run["peak_bytes"] >= run["step_peak_bytes"] > 0
        assert len(row["tokens_vs_compiled"]) == 2 and "step_memory_vs_eager" in row
    curve = results["curve"]
    assert len(curve["curve_32"]) == len(curve["curve_bf16"]) == curve["passes"] >= 1
    assert 0 <= curve["max_gap"] < 0.5 and curve["noise_max_gap"] >= 0


@pytest.mark.extended
def test_scale_benchmark_smoke(run_all):
    """The smoke's one-process and 2-rank variants ran, each code path once (one depth in a
    smoke run: no slope)."""
    from fxtrain._torch.version import at_least

    results = results_of(run_all[0], "scale")
    scale = imported("scale")
    not_run = set(results["not_run"])  # before torch 2.13: the sharded autograd steps, refused
    assert not_run == (set() if at_least(2, 13) else {"sharded_units"})
    assert set(results["rows"]) | not_run == set(scale.SMOKE)
    assert {"sharded_units", "data_parallel"} <= set(scale.SMOKE) <= {*scale.SINGLE, *scale.RANKS}
    for row in results["rows"].values():
        for run in row["runs"]:
            assert run["tokens_per_s"] > 0 and run["params"] > 0
            assert run["step_peak_bytes"] >= run["base_bytes"] > 0
            assert run["held_bytes"] >= run["tensor_bytes"] > 0


@pytest.mark.extended
def test_lm_benchmark_smoke(run_all):
    """Packed and padded rows of the same documents, the plain and the chunked loss in a GPT-2
    step (the smoke leaves out chunked_256, the same code with another chunk size): every row,
    the ratios, the two losses' loss and gradients within float32 rounding, and the report's
    section with its rows and targets."""
    lm = imported("lm")
    results = results_of(run_all[0], "lm")
    rows = results["rows"]
    assert set(rows) == {*lm.PACKING, *lm.CHUNKED} - {"chunked_256"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["step_peak_bytes"] >= row["base_bytes"] > 0
    padded, packed = rows["padded"], rows["packed"]
    assert packed["rows"] < padded["rows"] == results["config"]["docs"]
    assert 0 < padded["fill"] < packed["fill"] <= 1
    assert results["packed_vs_padded"] == packed["tokens_per_s"] / padded["tokens_per_s"]
    assert results["chunked_memory_vs_plain"] == (rows["chunked"]["activation_bytes"]
                                                  / rows["plain"]["activation_bytes"])
    close = results["differences"]["chunked"]
    assert close["within_rounding"] and close["loss"] <= lm.ROUNDING
    text = (run_all[1] / "RESULTS.md").read_text()
    assert "## A language model: packed rows and the chunked loss (`benchmarks/lm.py`)" in text
    report = imported("report")
    for variant in rows:
        assert f"| {report.LM[variant]}" in text
    assert "real tokens per second** of padded rows" in text
    assert "at most 0.6x the plain loss's: " in text and "within float32 rounding" in text


def test_scale_targets_are_read_from_two_depths():
    """The scale section's targets from a made-up two-depth result: each target's figure is
    the ratio its line names."""
    def row(per_param, step_s=1.0, tokens=100.0, transient=None):
        runs = [{"step_s": step_s, "tokens_per_s": tokens, "step_peak_bytes": 2**20}] * 2
        return {"bytes_per_param": per_param, "transient_per_param": transient or per_param / 2,
                "tokens_per_s": tokens, "runs": runs}

    rows = {"loop": row(50.0), "fx_func": row(60.0), "fx_autograd": row(45.0, transient=24.0),
            "fx_remat": row(25.0, step_s=1.3, transient=10.0),
            "fx_remat_dots": row(35.0, transient=16.0), "one_process": row(20.0, tokens=50.0),
            "data_parallel": row(20.0, tokens=90.0), "sharded_units": row(11.0, tokens=85.0)}
    lines = "\n".join(imported("report").scale_targets({"rows": rows}))
    assert "`autodiff=\"autograd\"` met (0.90x); `autodiff=\"func\"` 1.20x" in lines
    assert "at most 1/3 of without met (0.30;" in lines  # (10 - 4) / (24 - 4)
    assert "at most 1.4x the step time met (1.30x)" in lines
    assert "between the two met (12.0)" in lines
    assert "one process met (0.55x)" in lines
    assert "at least 0.9x data parallel's met (0.94x)" in lines


@pytest.mark.extended
def test_only_reruns_the_named_benchmarks_and_keeps_the_rest(run_all, tmp_path, monkeypatch):
    record, out = run_all
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    module = imported("run_all")
    again = {**record["benchmarks"]["memory"], "seconds": 1.5}
    monkeypatch.setattr(module, "run_child", lambda name, argv, capture=False: (again, ""))
    merged = module.main(["--only", "memory", "--smoke", "--out", str(tmp_path)])
    assert merged["benchmarks"] == {**record["benchmarks"], "memory": again}
    assert merged["seconds"] == record["seconds"] and merged["updates"][0]["benchmarks"] == [
        "memory"]
    header = (tmp_path / "RESULTS.md").read_text().split("\n## ")[0]
    assert "run_all.py --only memory --smoke" in header and "reran memory on" in header
    again_later = module.main(["--only", "memory", "--smoke", "--out", str(tmp_path)])
    assert [u["benchmarks"] for u in again_later["updates"]] == [["memory"]]  # the latest only
    header = (tmp_path / "RESULTS.md").read_text().split("\n## ")[0]
    assert header.count("reran memory on") == 1
    with pytest.raises(SystemExit, match="mix smoke and full"):
        module.main(["--only", "memory", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        module.main(["--only", "no_such_benchmark", "--out", str(tmp_path)])


def test_against_reads_every_row_step_overhead_prints(capsys):
    """benchmarks/against.py compares trees by the rows a script prints: every variant of
    step_overhead's report (and its feature table) is read back with its number, by section."""
    against, step_overhead = imported("against"), imported("step_overhead")
    med = {"a_eager_foreach": 2585.0, "c_handwritten_compiled": 8000.0,
           "d_fxtrain_compiled": 6989.0, "e_bare_loop": 5484.0, "f_fit": 5955.0,
           "g_fit_host_callbacks": 5343.0, "h_fit_logging": 4939.0}
    step_overhead.report("tiny", med)
    got = against.rows(capsys.readouterr().out)
    assert got == {f"tiny / {name}": float(round(rate)) for name, rate in med.items()}


@pytest.mark.extended
def test_meshes_benchmark_smoke():
    """benchmarks/meshes.py at a tiny size, one process and FSDP x TP on 4 gloo ranks (the
    other layouts' code paths are the tests'): each row's bytes, and what a rank holds of the
    state against one process (a quarter of the planned layers, half of the rest)."""
    meshes = imported("meshes")
    sys.path.insert(0, str(BENCHMARKS))  # the spawned ranks import the script by name
    try:
        result = meshes.main(["--smoke", "--layouts", "one_process", "fsdp_tp"])
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = result["rows"]
    assert set(rows) == {"one_process", "fsdp_tp"}
    assert all(row["held_bytes"] > row["state_bytes"] > 0 for row in rows.values())
    assert 0.25 < rows["fsdp_tp"]["state_vs_one"] < 0.35


@pytest.mark.extended
def test_fsdp2_benchmark_smoke(tmp_path):
    """benchmarks/fsdp2.py at a tiny size: every variant (fx.shard and FSDP2, eager and
    compiled) trains on one pair of gloo ranks, and the side-by-side table has a row per mode
    with the three ratios, and the targets."""
    fsdp2 = imported("fsdp2")
    sys.path.insert(0, str(BENCHMARKS))  # the spawned ranks import the script by name
    try:
        result = fsdp2.main(["--smoke", "--out", str(tmp_path / "fsdp2")])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert set(result["ratios"]) == {"2/eager", "2/compiled"}
    assert set(result["rounds"][0]["2"]) == set(fsdp2.DEFAULT_VARIANTS)
    for entry in result["ratios"].values():
        assert set(entry) == set(fsdp2.MEASURES)
        assert all(e["ratio"] > 0 and e["fxtrain"] > 0 and e["fsdp2"] > 0 for e in entry.values())
    text = (tmp_path / "fsdp2.md").read_text()
    assert "| 2 | eager | " in text and "| 2 | compiled | " in text
    assert "Targets (issue 61): fx.shard at most 1.00x FSDP2's held peak" in text
    assert json.loads((tmp_path / "fsdp2.json").read_text())["ratios"] == result["ratios"]
    for optimizer in ("sgd", "lion"):  # Lion: no torch.optim row
        sys.path.insert(0, str(BENCHMARKS))
        try:  # --update: the update alone, each variant's CPU seconds
            rows = fsdp2.main(["--smoke", "--update", "--optimizer", optimizer])
        finally:
            sys.path.remove(str(BENCHMARKS))
        assert set(rows) == set(fsdp2.UPDATES) - ({"torch_foreach"} if optimizer == "lion"
                                                  else set())
        assert all(v > 0 for v in rows.values())


def test_resident_splits_glibcs_bytes_by_arena_and_samples_the_peak():
    """benchmarks/resident.py's measure: a tensor above glibc's mmap threshold (64 MiB: above
    the most it raises it to, 32 MiB) counts as mmapped while alive and leaves when freed;
    small tensors a thread of its own allocates count in the other arenas; the sampler's peak
    holds a tensor freed before it stops, and its split at that peak counts it."""
    resident, mib = imported("resident"), 2**20
    before = resident.malloc_parts()
    big = torch.ones(16 * mib)  # 64 MiB, touched
    alive = resident.malloc_parts()
    del big
    after = resident.malloc_parts()
    assert alive["mmapped"] - before["mmapped"] >= 64 * mib > alive["mmapped"] - after["mmapped"] - mib
    kept = []
    thread = threading.Thread(target=lambda: kept.extend(torch.ones(1000) for _ in range(200)))
    thread.start()
    thread.join()
    assert resident.malloc_parts()["others_used"] - after["others_used"] >= 200 * 4000
    with resident.PeakSampler() as sampler:
        x = torch.ones(50 * mib)  # 200 MiB
        time.sleep(0.05)
        del x
        time.sleep(0.01)
    assert sampler.peak >= sampler.top >= 200 * mib
    assert sampler.parts["mmapped"] >= 200 * mib
    # "rest" closes the sum, to the resident set's move while glibc answered
    assert abs(sum(sampler.parts.values()) - sampler.top) <= 2**20


def test_resident_reports_bytes_per_parameter_as_the_slope_and_rounds_by_median():
    """The slope over the depths per run; over rounds, each measure's median, and the ratio
    to one process taken within each round (its median and range)."""
    resident = imported("resident")
    parts = dict.fromkeys((*resident.PARTS, "unsampled"), 0)

    def round_(one: float, shard: float) -> dict:
        rows = [{"variant": v, "allocator": "glibc", "params": n, **parts,
                 "peak": 100 + n * per, "mmapped": n * per}
                for v, per in (("one process", one), ("fx.shard", shard)) for n in (1000, 3000)]
        return resident.per_parameter(rows)

    assert round_(20, 10)[("fx.shard", "glibc")] == {**parts, "peak": 10, "mmapped": 10}
    rounds = [round_(20, 10), round_(16, 12), round_(30, 9)]
    merged = resident.medians(rounds)[("fx.shard", "glibc")]
    assert merged["peak"] == 10 and merged["peak_range"] == (9, 12)
    assert merged["ratio"] == 0.5 and merged["ratio_range"] == (0.3, 0.75)
    text = resident.markdown({"date": "d", "cpu": "c", "torch": "t", "argv": [], "width": 8,
                              "world": 2, "rounds": 3, "per_parameter": {
                                  " | ".join(k): v for k, v in resident.medians(rounds).items()}})
    assert "| glibc | fx.shard | 10.0 (9.0-12.0) | 0.50x (0.30-0.75) | " in text
    assert "| glibc | one process | 20.0 (16.0-30.0) | 1.00x (1.00-1.00) | " in text


@pytest.mark.extended
def test_resident_benchmark_smoke(tmp_path):
    """benchmarks/resident.py at a tiny size: every run under two allocators' settings (the
    processes started with them), a slope per run, the table written."""
    resident = imported("resident")
    sys.path.insert(0, str(BENCHMARKS))  # the spawned ranks import the script by name
    try:
        result = resident.main(["--smoke", "--allocators", "glibc", "mmap-128k",
                                "--out", str(tmp_path / "resident")])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert {(r["variant"], r["allocator"]) for r in result["rows"][0]} == {
        (v, a) for v in resident.VARIANTS for a in ("glibc", "mmap-128k")}
    (rows,) = result["rows"]  # one round
    assert all(r["peak"] >= r["sampled"] > 0 and r["peak"] >= r["base"] for r in rows)
    assert len(result["per_parameter"]) == 6
    assert "| mmap-128k | FSDP2 | " in (tmp_path / "resident.md").read_text()


# torch 2.11's Dynamo refuses the script's requires_grad_() inside the graph (fxtrain makes its
# leaves its own way); the script measures a design on 2.13, CI's torch
@pytest.mark.extended
@pytest.mark.needs_torch(2, 13, "benchmarks/scan_depth.py's autograd.grad inside the graph")
def test_scan_depth_smoke(monkeypatch):
    """benchmarks/scan_depth.py --smoke (one layer, aot_eager, each variant in a fresh process):
    every variant compiles into one graph and trains the same model (their first and second
    losses agree with each other, and the first with the eager step's, to float32 rounding: a
    few ops of 64 terms)."""
    monkeypatch.setenv(imported("common").BACKEND, "aot_eager")  # restored after: main sets it
    bench = imported("scan_depth")
    rows = bench.main(["--smoke"])
    assert sorted((r["variant"], r["layers"]) for r in rows) == sorted(
        (v, 1) for v in bench.VARIANTS)
    for r in rows:
        assert r["graphs"] == 1 and not r["recompiled"] and r["first_cpu_s"] > 0, r
        assert math.isclose(r["loss"], r["eager_loss"], rel_tol=1e-5), r
        assert r["second_loss"] < r["loss"], r  # the update trained
        for key in ("loss", "second_loss"):
            assert math.isclose(r[key], rows[0][key], rel_tol=1e-5), (key, rows)
