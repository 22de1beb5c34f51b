"""test_checkpoint_inspect's tests that run processes (the rest: tests/unit/test_checkpoint_inspect.py)."""

import subprocess
import sys
import torch
import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from fxtrain.cli import main
from helpers import mlp
from helpers_checkpoint import saved


def test_inspect_runs_as_the_console_command(tmp_path):
    saved(tmp_path)
    out = subprocess.run([sys.executable, "-m", "fxtrain", "inspect", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "checkpoints in" in out.stdout, out.stderr
