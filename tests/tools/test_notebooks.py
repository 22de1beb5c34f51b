"""The notebooks in notebooks/ run top to bottom, are committed without outputs, and leave no files.

Each notebook runs in a fresh Jupyter kernel (nbclient, kernel "python3": this venv's Python, as
``python -m ipykernel install --sys-prefix --name python3`` installs it), with fxtrain imported
from this checkout. The kernel starts in an empty working directory and its temporary directory
(``TMPDIR``) is another empty one, so the test can check that a notebook wrote nothing there
except inside temporary directories it removed again, and nothing in the repository.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_callbacks.ipynb", "03_functional_restore.ipynb",
            "04_compiled_benchmark.ipynb", "05_transformer.ipynb", "06_config_run.ipynb")
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # the first torch.compile in a cold cache takes tens of seconds on 2 cores
# Not files a notebook writes: tool caches, the environment and version control.
IGNORED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis",
                ".mypy_cache", ".ruff_cache"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a cell whose outputs must hold fit's default progress bar (a widget, or tqdm's text bar where
# ipywidgets is missing), though the notebook asks for no callback
DEFAULT_PROGRESS = {"06_config_run.ipynb": 3}


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _files(root: Path) -> set[str]:
    """Every file under ``root`` (relative paths), skipping caches, .git and the venv."""
    found = set()
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info")
                   and not d.startswith(".venv-")]  # scripts/compat.sh's, made beside the suite
        found.update(os.path.relpath(os.path.join(here, f), root) for f in files)
    return found


def _check_kernel() -> None:
    """Fails unless the kernel exists and runs the interpreter that runs the tests."""
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel named {KERNEL!r}; install this venv's with "
                    f"`{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL}`",
                    pytrace=False)
    prefix = subprocess.run([spec.argv[0], "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if prefix != sys.prefix:
        pytest.fail(f"the Jupyter kernel {KERNEL!r} runs {spec.argv[0]} (prefix {prefix or '?'}), "
                    f"not this environment ({sys.prefix}); run `{sys.executable} -m ipykernel "
                    f"install --sys-prefix --name {KERNEL}`", pytrace=False)


def _inductor_cache_link(tmpdir: Path) -> Path:
    """Points ``tmpdir/torchinductor_<user>`` at torch.compile's usual cache.

    torch keeps its compile cache (precompiled headers among it, 150 MB) under the temporary
    directory; the link keeps it warm and shared while the kernel's TMPDIR is ``tmpdir``.
    """
    name = f"torchinductor_{getpass.getuser()}"
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir(), name))
    cache.mkdir(parents=True, exist_ok=True)
    link = tmpdir / name
    link.symlink_to(cache, target_is_directory=True)
    return link


def _kernel_env(tmpdir: Path, inductor_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(tmpdir)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    # the machine-dependent branch forced: 05_transformer trains bf16-mixed on every machine, as
    # it does on those with native bfloat16 (where the purity cell once caught two losses)
    env["FXTRAIN_NATIVE_BF16"] = "1"
    return env


def _failure(nb, error: Exception) -> str:
    index = next((i for i, cell in enumerate(nb.cells)
                  if any(o.get("output_type") == "error" for o in cell.get("outputs", []))), "?")
    return f"cell {index} (from 0, markdown included) failed:\n{ANSI.sub('', str(error))}"


def test_the_notebooks_are_all_here():
    assert {p.name for p in _notebooks()} >= set(EXPECTED)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; "
                       f"clear them (jupyter nbconvert --clear-output --inplace {path})")


@pytest.mark.slow
@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    _check_kernel()
    workdir, tmpdir = tmp_path / "work", tmp_path / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    inductor_cache = _inductor_cache_link(tmpdir)
    source = path.read_bytes()
    repo_before = _files(REPO)

    nb = nbformat.reads(source.decode(), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(workdir)}})
    start, error = time.perf_counter(), None
    try:
        client.execute(env=_kernel_env(tmpdir, inductor_cache))
    except nbclient.exceptions.CellExecutionError as e:
        error = e
    if error is not None:  # failed outside the except block: the report shows the cell once
        pytest.fail(f"{path.name}: {_failure(nb, error)}", pytrace=False)
    print(f"{path.name} ran in {time.perf_counter() - start:.1f} s")

    if path.name in DEFAULT_PROGRESS:
        outputs = nb.cells[DEFAULT_PROGRESS[path.name]].outputs
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   or "train:" in o.get("text", "") for o in outputs), outputs
    assert path.read_bytes() == source, f"{path.name} was modified on disk by running it"
    new = sorted(_files(REPO) - repo_before)
    assert not new, f"{path.name} wrote into the repository: {new}"
    assert not _files(workdir), f"{path.name} wrote into its working directory: {_files(workdir)}"
    left = sorted(p.name for p in tmpdir.iterdir() if p != inductor_cache)
    assert not left, f"{path.name} left temporary files behind: {left}"
