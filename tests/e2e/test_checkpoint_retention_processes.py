"""test_checkpoint_retention's tests that run processes (the rest: tests/unit/test_checkpoint_retention.py)."""

import json
import math
import os
import subprocess
import sys
import pytest
import torch
from hypothesis import given, settings, strategies as st
import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, layout, retention
from helpers import TESTS, mlp
from helpers_checkpoint import LOSSES, SHARDED, SURVIVORS


@pytest.mark.slow
def test_sharded_saves_keep_the_same_checkpoints(tmp_path):
    """A sharded state (torch.distributed.checkpoint, not orbax) on a one-rank process group."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(tests=str(TESTS), store=str(tmp_path / "pg"),
                                     dir=str(tmp_path / "ck"), losses=LOSSES))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [SURVIVORS, SURVIVORS]
