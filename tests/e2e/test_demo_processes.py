"""test_demo's tests that run processes (the rest: tests/unit/test_demo.py)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
import pytest
from helpers import reaped, sigint_back
from PIL import Image
from fxtrain import cli
from fxtrain.checkpoint import inspect
from fxtrain.apps.demo import figures, tasks
from fxtrain.logging import read_jsonl
from helpers_apps import KILLED_RUNS, digest_of, run_cli, wait_for_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("model", list(KILLED_RUNS))
def test_killed_and_resumed_demo_ends_with_the_uninterrupted_digest(tmp_path, model):
    """The promise: SIGKILL after a checkpoint, --resume, and the run is bit for bit the same
    (every callback, logs). The uninterrupted default demo also reaches its stated accuracy
    (docs/demo.md): at least 95% on the held-out digits."""
    flags, kill_after = KILLED_RUNS[model]
    # FXTRAIN_NATIVE_BF16=1: the transformer trains bf16-mixed, as on a machine with native
    # bfloat16, on every machine (the branch a user with such a CPU or a GPU takes)
    env = {**os.environ, "PYTHONHASHSEED": "0", "FXTRAIN_NATIVE_BF16": "1"}
    with reaped(run_cli(tmp_path / "whole", *flags, env=env)) as whole:
        out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    assert "nan_guard" not in out + err, (out + err)[-3000:]
    if model == "transformer":
        assert "precision bf16-mixed" in out
    if model == "mlp":
        accuracy = float(re.search(r"final held-out metrics.*accuracy ([\d.]+)", out).group(1))
        assert accuracy >= 0.95 and "target: accuracy >= 0.95: met" in out

    with reaped(run_cli(tmp_path / "split", *flags, env=env)) as killed:
        wait_for_checkpoint(killed, tmp_path / "split" / "checkpoints", kill_after)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    steps = [int(p.name) for p in (tmp_path / "split" / "checkpoints").iterdir()
             if p.name.isdigit()]
    total = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else \
        tasks.DEFAULTS[model]["steps"]
    assert kill_after in steps and max(steps) < total
    with reaped(run_cli(tmp_path / "split", *flags, "--resume", env=env)) as resumed:
        out2, err2 = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err2[-3000:]
    assert "resuming from the checkpoint of step" in out2
    assert digest_of(out2) == digest_of(out)
    keys = ["train/loss", "eval/loss", "eval/accuracy"]
    assert (figures.read_curves(tmp_path / "split" / "metrics.jsonl", keys)
            == figures.read_curves(tmp_path / "whole" / "metrics.jsonl", keys))


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    with reaped(run_cli(tmp_path, "--steps", "100000", "--checkpoint-every", "50",
                        "--no-compile", "--eval-every", "50")) as proc:
        wait_for_checkpoint(proc, tmp_path / "checkpoints", 50)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    (stopped,) = re.findall(r"interrupted at step (\d+)", out)
    assert (tmp_path / "checkpoints" / stopped).is_dir()
    assert f"fxtrain demo --workdir {tmp_path} --steps 100000" in out and "--resume" in out
