"""test_fit's tests that run processes (the rest: tests/unit/test_fit.py)."""

import os
import signal
import subprocess
import sys
import pytest
import torch
import fxtrain as fx
from helpers import CTRL_C, TESTS, FakeManager, extra, mlp, reaped, sigint_back, xent


@pytest.mark.slow
def test_ctrl_c_delivers_train_end_saves_and_reraises(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CTRL_C.format(tests=str(TESTS), ckpt=str(tmp_path / "ckpt")))
    lines = []
    with reaped(subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                 text=True, preexec_fn=sigint_back)) as proc:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("step 5"):
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode != 0  # KeyboardInterrupt propagated
    end = lines.index("train_end interrupted")
    step = int(lines[end - 2].split()[1])
    assert lines[end - 1] == f"saved {step}" and lines[end + 1] == f"interrupted at {step}"
    template = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1))
    saved = fx.checkpoint.restore(tmp_path / "ckpt", like=template.replace(
        data=fx.data.DataPosition.start()))
    assert int(saved.step) == step  # the interrupted state is on disk
