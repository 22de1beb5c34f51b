"""test_entry_points's tests that run several ranks (the rest: tests/unit/test_entry_points.py)."""

import subprocess
import sys
from pathlib import Path
import pytest
from fxtrain.logging import read_jsonl


@pytest.mark.slow
def test_demo_runs_under_torchrun_with_two_processes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "-m", "fxtrain", "demo", "--steps", "20",
                          "--eval-every", "20", "--no-compile"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("final held-out metrics") == 1  # rank 0 reports
    run = tmp_path / "runs" / "demo-mlp"
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    assert (run / "checkpoints" / "20").is_dir()
    # the held-out set is sharded across the ranks: each of the 359 digits is counted once
    (table,) = [e["values"]["eval/confusion"] for e in read_jsonl(run / "metrics.jsonl")
                if e["kind"] == "texts" and "eval/confusion" in e["values"]]
    rows = [line.strip("|").split("|")[1:] for line in table.splitlines()[2:] if line]
    assert sum(float(x) for row in rows for x in row) == 359
