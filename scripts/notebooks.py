"""Runs the notebooks in notebooks/ as the docs site shows them, and builds the site.

Each notebook runs once, top to bottom, in a fresh Jupyter kernel (nbclient, kernel ``python3``:
the venv's Python, as ``python -m ipykernel install --sys-prefix --name python3`` installs it),
with fxtrain imported from this checkout. The kernel starts in an empty working directory and its
temporary directory (``TMPDIR``) is another empty one, so what a notebook leaves behind can be
listed. The executed copies are what the site renders (``docs/notebook_pages.py``, mkdocs-jupyter
with ``execute: false``): the suite executes each notebook once, checks it, and builds the site
from its copies (``tests/tools/test_docs.py``).

    python scripts/notebooks.py OUT                # executed copies in OUT/notebooks/
    python scripts/notebooks.py OUT --site SITE    # and the site, mkdocs build --strict
    python scripts/notebooks.py OUT --figure       # and README's figure from 01_quickstart's

``--figure`` writes ``docs/images/quickstart-loss.png``, the loss curve the quickstart plots, which
the README and the notebooks page show.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIGURE = ROOT / "docs" / "images" / "quickstart-loss.png"
FIGURE_NOTEBOOK = "01_quickstart.ipynb"
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # the first torch.compile in a cold cache takes tens of seconds on 2 cores
EXECUTED = "FXTRAIN_EXECUTED_NOTEBOOKS"  # docs/notebook_pages.py reads the copies from there
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Run(NamedTuple):
    """One notebook run: the executed notebook, its time, and what it left behind.

    ``error`` names the failed cell (from 0, markdown included) and its traceback, or is None;
    ``left`` lists the files left in its working directory and temporary directory.
    """

    notebook: nbformat.NotebookNode
    seconds: float
    error: str | None
    left: tuple[str, ...]


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


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


def kernel_env(tmpdir: Path, inductor_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(tmpdir)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    # the machine-dependent branch forced: 05_transformer trains bf16-mixed on every machine, as
    # it does on those with native bfloat16 (where the purity cell once caught two losses)
    env["FXTRAIN_NATIVE_BF16"] = "1"
    return env


def _files(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(here, f), root)
                  for here, _, files in os.walk(root) for f in files)


def _failure(nb: nbformat.NotebookNode, error: Exception) -> str:
    index = next((i for i, cell in enumerate(nb.cells)
                  if any(o.get("output_type") == "error" for o in cell.get("outputs", []))), "?")
    return f"cell {index} (from 0, markdown included) failed:\n{ANSI.sub('', str(error))}"


def execute(path: Path, scratch: Path) -> Run:
    """Runs ``path`` in a fresh kernel, its working and temporary directories empty folders in
    ``scratch`` (which must not exist); the file itself is not written."""
    workdir, tmpdir = scratch / "work", scratch / "tmp"
    workdir.mkdir(parents=True)
    tmpdir.mkdir()
    inductor_cache = _inductor_cache_link(tmpdir)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(workdir)}})
    start, error = time.perf_counter(), None
    try:
        client.execute(env=kernel_env(tmpdir, inductor_cache))
    except nbclient.exceptions.CellExecutionError as e:
        error = _failure(nb, e)
    seconds = time.perf_counter() - start
    left = [f"work/{f}" for f in _files(workdir)]
    left += [f"tmp/{p.name}" for p in sorted(tmpdir.iterdir()) if p != inductor_cache]
    return Run(nb, seconds, error, tuple(left))


def figure_png(nb: nbformat.NotebookNode) -> bytes:
    """The first PNG figure among ``nb``'s outputs."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                return base64.b64decode(output["data"]["image/png"])
    raise ValueError("the notebook shows no PNG figure")


def build_site(site: Path, executed: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` into ``site``, the notebook pages from the copies in
    ``executed/notebooks/``."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", **{EXECUTED: str(executed)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def execute_all(out: Path) -> dict[str, Run]:
    """Each notebook executed once, its copy written to ``out/notebooks/`` (where the site's
    build takes it: ``build_site``); raises on a failed cell."""
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fxtrain-notebooks-") as scratch:
        for path in notebooks():
            run = runs[path.name] = execute(path, Path(scratch, path.stem))
            if run.error:
                raise RuntimeError(f"{path.name}: {run.error}")
            nbformat.write(run.notebook, out / "notebooks" / path.name)
            print(f"{path.name}: {run.seconds:.1f} s", file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the executed copies")
    parser.add_argument("--site", type=Path, help="build the site (strict) into this folder")
    parser.add_argument("--figure", action="store_true", help=f"write {FIGURE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    runs = execute_all(args.out)
    if args.figure:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        FIGURE.write_bytes(figure_png(runs[FIGURE_NOTEBOOK].notebook))
    if args.site:
        built = build_site(args.site, args.out)
        print(built.stdout + built.stderr, file=sys.stderr, end="")
        return built.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
