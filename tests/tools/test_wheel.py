"""The wheel a user installs (issue 62): built with python -m build, installed with pip into a
fresh venv that already has this process's torch, it keeps that torch and runs a step there
(scripts/wheel.sh; CI runs it for other torches too)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxtrain._torch.version import release

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_installs_beside_an_existing_torch_and_keeps_it(tmp_path):
    version = "%d.%d.%d" % release()
    env = {**os.environ, "FXTRAIN_WHEEL_DIST": str(tmp_path / "dist"),
           "FXTRAIN_WHEEL_INSTALLER": "pip", "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # the venv's fxtrain, not this checkout's
    done = subprocess.run(["bash", "scripts/wheel.sh", version], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    built = sorted(p.name for p in (tmp_path / "dist").iterdir())
    assert [n for n in built if n.endswith((".whl", ".tar.gz"))] == [
        "fxtrain-%s-py3-none-any.whl" % __import__("fxtrain").__version__,
        "fxtrain-%s.tar.gz" % __import__("fxtrain").__version__]
    assert re.search(rf"torch {re.escape(version)}\S* kept", done.stdout), done.stdout
    assert f"beside torch {torch.__version__}" in done.stdout, done.stdout
