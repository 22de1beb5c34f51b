"""The notebooks in notebooks/ are all here, committed without outputs, and the way they are run
catches a failed cell and a file left behind.

The suite runs each notebook once, where the docs site is built from the executed copies
(``tests/tools/test_docs.py``, ``helpers_notebooks.run_checked``): in a fresh Jupyter kernel
(nbclient, kernel "python3": this venv's Python, as ``python -m ipykernel install --sys-prefix
--name python3`` installs it), with fxtrain imported from this checkout, in an empty working
directory with another empty one as its temporary directory (``TMPDIR``), so that a notebook that
writes anywhere but inside temporary directories it removes again is caught.
"""

from __future__ import annotations

import nbformat
import pytest
from helpers_notebooks import REPO, check_kernel, runner

NOTEBOOKS = REPO / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_callbacks.ipynb", "03_functional_restore.ipynb",
            "04_compiled_benchmark.ipynb", "05_transformer.ipynb", "06_config_run.ipynb")


def _notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_all_here():
    assert {p.name for p in _notebooks()} >= set(EXPECTED)
    assert [p.name for p in runner().notebooks()] == [p.name for p in _notebooks()]


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; "
                       f"clear them (jupyter nbconvert --clear-output --inplace {path})")


def test_a_failed_cell_and_files_left_behind_are_caught(tmp_path):
    """Planted: a notebook that writes into its working directory and its TMPDIR, removes a
    temporary directory of its own, then fails."""
    script = runner()
    check_kernel(script.KERNEL)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# planted"),
        nbformat.v4.new_code_cell(
            "import pathlib, tempfile\n"
            "pathlib.Path('here.txt').write_text('x')\n"
            "pathlib.Path(tempfile.gettempdir(), 'left.txt').write_text('x')\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    pathlib.Path(d, 'removed.txt').write_text('x')"),
        nbformat.v4.new_code_cell("raise ValueError('planted')"),
    ], metadata={"kernelspec": {"name": script.KERNEL, "display_name": "Python 3"}})
    path = tmp_path / "planted.ipynb"
    nbformat.write(nb, path)
    run = script.execute(path, tmp_path / "scratch")
    assert run.error is not None and run.error.startswith("cell 2 (from 0, markdown included)")
    assert "ValueError: planted" in run.error
    assert run.left == ("work/here.txt", "tmp/left.txt"), run.left
