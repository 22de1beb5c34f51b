"""test_checkpoint's tests that run processes (the rest: tests/unit/test_checkpoint.py)."""

import errno
import os
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, CheckpointMismatchError
from helpers import TESTS, classification_batch, mlp, xent
from helpers_checkpoint import FULL_DISK, make_state


@pytest.mark.slow
def test_a_full_disk_raises_and_keeps_the_older_checkpoints(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK.format(tests=str(TESTS), dir=str(tmp_path / "ck")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert "raised: " in out.stdout and "step 2" in out.stdout, out.stdout + out.stderr[-2000:]
    with CheckpointManager(tmp_path / "ck") as m:
        assert m.all_steps() == [1]
        assert int(m.restore(like=make_state(tx=fx.optim.adamw(1e-2)).replace(
            params=fx.TrainState.create(mlp((64, 256, 64)), fx.optim.adamw(1e-2)).params,
            opt_state=fx.TrainState.create(mlp((64, 256, 64)), fx.optim.adamw(1e-2)).opt_state
        )).step) == 1


def test_import_fxtrain_does_not_import_orbax_or_jax():
    code = "import sys, fxtrain; print('orbax' in sys.modules or 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
