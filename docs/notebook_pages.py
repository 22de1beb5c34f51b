"""mkdocs hook: the notebooks in notebooks/ as pages of the site, executed.

The pages are the executed copies in ``$FXTRAIN_EXECUTED_NOTEBOOKS/notebooks/`` (the test suite
executes each notebook once, checks the run and builds the site from its copies) or, without it,
copies this build executes itself (``scripts/notebooks.py``: a fresh kernel each, in empty
folders), once per build. mkdocs-jupyter renders them as they are (``execute: false``).
Each becomes ``notebooks/<name>.ipynb`` in the site's files, the page ``notebooks/<name>/``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import mkdocs.exceptions
import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
_executed_here: tempfile.TemporaryDirectory | None = None


def _script():
    spec = importlib.util.spec_from_file_location("notebooks", ROOT / "scripts" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executed() -> Path:
    global _executed_here
    script = _script()
    given = os.environ.get(script.EXECUTED)
    if given:
        return Path(given, "notebooks")
    _executed_here = tempfile.TemporaryDirectory(prefix="fxtrain-executed-")
    try:
        script.execute_all(Path(_executed_here.name))
    except RuntimeError as e:  # a failed cell, named
        raise mkdocs.exceptions.PluginError(str(e)) from None
    return Path(_executed_here.name, "notebooks")


@mkdocs.plugins.event_priority(50)  # before mkdocs-jupyter's on_files, which wraps .ipynb files
def on_files(files, config):
    executed = _executed()
    expected = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    found = sorted(p.name for p in executed.glob("*.ipynb"))
    if found != expected:
        raise mkdocs.exceptions.PluginError(
            f"{executed} holds the executed notebooks {found}, not notebooks/'s {expected}; "
            "execute them with `python scripts/notebooks.py OUT` (copies in OUT/notebooks/)")
    for name in found:
        # a File of a real folder: mkdocs-jupyter's wrapper loses a generated file's path
        files.append(File(f"notebooks/{name}", src_dir=str(executed.parent),
                          dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_post_build(config):
    global _executed_here
    if _executed_here is not None:
        _executed_here.cleanup()
        _executed_here = None
