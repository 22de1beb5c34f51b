"""Functional checkpoints on orbax-checkpoint: the whole state saved as one value, restored into
a template (``restore(like=state)``) as a new value.

orbax (and jax) are imported on the first save or restore, never by ``import fxtrain``.
"""

import importlib
from typing import TYPE_CHECKING

# imported on first use, so that reading a directory's descriptions (``fxtrain inspect``) needs
# neither torch nor orbax
_NAMES = {"CheckpointMismatchError": "bridge", "CheckpointManager": "manager",
          "DamagedCheckpointError": "layout", "UnreadableCheckpointError": "layout",
          "restore": "manager", "save": "manager"}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'fxtrain.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})


if TYPE_CHECKING:  # what type checkers, IDEs and the API reference see: the names, eagerly
    from .bridge import CheckpointMismatchError
    from .layout import DamagedCheckpointError, UnreadableCheckpointError
    from .manager import CheckpointManager, restore, save


__all__ = ["CheckpointManager", "save", "restore", "CheckpointMismatchError",
           "DamagedCheckpointError", "UnreadableCheckpointError"]
