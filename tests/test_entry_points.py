import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "fxtrain", "demo", "--steps", "30", "--no-compile"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout


def smoke(script):
    """Runs ``benchmarks/<script>.py --smoke``; returns the module and its results."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        module = importlib.import_module(script)
        return module, module.main(["--smoke"])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_step_overhead_benchmark_smoke():
    step_overhead, results = smoke("step_overhead")
    assert set(results["tiny"]) == set(step_overhead.VARIANTS) | {
            "e_bare_loop", "f_fit", "g_fit_host_callbacks", "h_fit_logging"}
    assert all(rate > 0 for rate in results["tiny"].values())


@pytest.mark.slow
def test_checkpoint_benchmark_smoke():
    _, results = smoke("checkpoint")
    (times,) = results.values()
    assert times and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_distributed_benchmark_smoke():
    _, results = smoke("distributed")
    assert set(results["tiny"]) == {"1", "2", "efficiency"}
    assert all(v > 0 for v in results["tiny"].values())


@pytest.mark.slow
def test_demo_runs_under_torchrun_with_two_processes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "-m", "fxtrain", "demo", "--steps", "20",
                          "--no-compile"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("held-out accuracy") == 1  # rank 0 reports
