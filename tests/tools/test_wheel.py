"""The wheel a user installs (issue 62): built with python -m build, installed with pip into a
fresh venv that already has this process's torch, it keeps that torch and runs a step there
(scripts/wheel.sh). CI runs it under torch 2.13.0 (the suite) and 2.15.0 (its second leg)."""

import os
import re
import shutil
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
    source = _checkout_copy(tmp_path / "fxtrain")  # the build and its venvs write beside it
    env = {**os.environ, "PYTHON": sys.executable}
    if "+cpu" in torch.__version__:  # the CPU build: from this machine's wheels, which pip reads
        env["FXTRAIN_WHEEL_INSTALLER"] = "pip"  # (else uv's cache, where compat.sh put it)
    env.pop("PYTHONPATH", None)  # the venv's fxtrain, not this checkout's
    done = subprocess.run(["bash", "scripts/wheel.sh", version], cwd=source, env=env, text=True,
                          capture_output=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    built = sorted(p.name for p in (source / "dist").iterdir())
    assert [n for n in built if n.endswith((".whl", ".tar.gz"))] == [
        "fxtrain-%s-py3-none-any.whl" % __import__("fxtrain").__version__,
        "fxtrain-%s.tar.gz" % __import__("fxtrain").__version__]
    assert re.search(rf"torch {re.escape(version)}\S* kept", done.stdout), done.stdout
    assert f"beside torch {torch.__version__}" in done.stdout, done.stdout


def _checkout_copy(to: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked ones it does not ignore),
    copied to ``to``: the build (``build/``, ``*.egg-info``, ``dist/``) and the script's venvs
    are made there, so nothing is written into the checkout while other tests read it."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to
