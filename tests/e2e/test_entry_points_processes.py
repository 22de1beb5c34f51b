"""test_entry_points's tests that run processes (the rest: tests/unit/test_entry_points.py)."""

import subprocess
import sys
from pathlib import Path
import pytest
from fxtrain.logging import read_jsonl


@pytest.mark.parametrize("command", [[sys.executable, "-m", "fxtrain"],
                                     [str(Path(sys.executable).parent / "fxtrain")]])
def test_demo_runs_as_a_module_and_as_the_console_script(tmp_path, command):
    out = subprocess.run([*command, "demo", "--steps", "30", "--no-compile", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "final held-out metrics (step 30)" in out.stdout
    assert (tmp_path / "runs" / "demo-mlp" / "loss_curve.png").is_file()  # the default workdir
