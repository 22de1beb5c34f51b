"""The applications on fxtrain: the command line (``_cli.py``; ``fxtrain.cli`` is its entry),
config runs (``_configured.py``: ``fxtrain train``, ``fx.train``; ``_saved_config.py``: the
config a workdir's run was trained with), one run per workdir (``_workdir.py``: its lock), the
exit statuses (``_exits.py``) and the end of a run nan_guard stopped (``_nonfinite.py``), a
checkpoint out to a Hugging Face folder (``_pretrained.py``: ``fxtrain export``,
``fx.export_pretrained``) and the demo (``demo/``: ``fxtrain demo``). Nothing here is imported
by the library below it.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"ConfigError": "_configured", "run": "_configured", "WorkdirLocked": "_workdir"}
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    """The errors a run of the command line raises, and ``run``, imported on first use (the
    command line starts without torch)."""
    if name not in _NAMES:
        raise AttributeError(f"module 'fxtrain.apps' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
