"""Running a notebook as the suite checks it (scripts/notebooks.py runs it), for test_docs.py's site
build, which executes each notebook once, and test_notebooks.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import script_module
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

REPO = Path(__file__).resolve().parents[1]
# Not files a notebook writes: tool caches, the environment and version control.
IGNORED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis",
                ".mypy_cache", ".ruff_cache"}
# a cell whose outputs must hold fit's default progress bar (a widget, or tqdm's text bar where
# ipywidgets is missing), though the notebook asks for no callback
DEFAULT_PROGRESS = {"06_config_run.ipynb": 3}


def runner():
    """scripts/notebooks.py, which runs the notebooks and builds the site."""
    return script_module("notebooks")


def repo_files(root: Path = REPO) -> set[str]:
    """Every file under ``root`` (relative paths), skipping caches, .git and the venv."""
    found = set()
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info")
                   and not d.startswith(".venv-")]  # scripts/compat.sh's, made beside the suite
        found.update(os.path.relpath(os.path.join(here, f), root) for f in files)
    return found


def check_kernel(kernel: str) -> None:
    """Fails unless the kernel exists and runs the interpreter that runs the tests."""
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel named {kernel!r}; install this venv's with "
                    f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel}`",
                    pytrace=False)
    prefix = subprocess.run([spec.argv[0], "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if prefix != sys.prefix:
        pytest.fail(f"the Jupyter kernel {kernel!r} runs {spec.argv[0]} (prefix {prefix or '?'}), "
                    f"not this environment ({sys.prefix}); run `{sys.executable} -m ipykernel "
                    f"install --sys-prefix --name {kernel}`", pytrace=False)


def run_checked(path: Path, scratch: Path):
    """``path`` run once as the site shows it, failing the test if a cell fails, if the notebook
    file changed, or if the run left a file in the repository, its working directory or its
    temporary directory (inside temporary directories it removed again is fine). Returns the
    executed notebook."""
    script = runner()
    check_kernel(script.KERNEL)
    source, repo_before = path.read_bytes(), repo_files()
    run = script.execute(path, scratch)
    if run.error is not None:
        pytest.fail(f"{path.name}: {run.error}", pytrace=False)
    print(f"{path.name} ran in {run.seconds:.1f} s")
    assert path.read_bytes() == source, f"{path.name} was modified on disk by running it"
    new = sorted(repo_files() - repo_before)
    assert not new, f"{path.name} wrote into the repository: {new}"
    assert not run.left, f"{path.name} left files in its working or temporary directory: {run.left}"
    if path.name in DEFAULT_PROGRESS:
        outputs = run.notebook.cells[DEFAULT_PROGRESS[path.name]].outputs
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   or "train:" in o.get("text", "") for o in outputs), outputs
    return run.notebook
