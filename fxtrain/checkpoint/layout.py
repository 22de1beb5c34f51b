"""What a checkpoint directory looks like, read without torch, numpy or orbax: which entries
are finished checkpoints, and each one's JSON description (the leaf table, step, metrics,
metadata). ``fxtrain inspect`` lists checkpoints with this alone, so it starts in well under a
second; reading arrays is ``fxtrain.checkpoint.store``'s.

An orbax checkpoint ``<step>/`` holds the ``state`` item (arrays) and the ``fxtrain`` item, the
description, which orbax's JSON handler writes as ``fxtrain/metadata``; a sharded one
(``fxtrain.checkpoint.shards``) holds ``shards/`` and the description as ``fxtrain.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE, META = "state", "fxtrain"
JSON_ITEM = "metadata"  # the file orbax's JsonCheckpointHandler writes in an item's directory
TABLE = "fxtrain.json"  # a sharded checkpoint's description, written last


class DamagedCheckpointError(ValueError):
    """A checkpoint on disk cannot be read back as it was written: a file is missing, truncated
    or altered. The message names the checkpoint and what failed."""


def _cause(error: BaseException) -> str:
    """The first line of a storage error, without tensorstore's JSON spec."""
    text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def damage(path: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"the checkpoint at {path} is damaged: {what}")


def damaged(path: Path, error: BaseException, what: str) -> DamagedCheckpointError:
    """The error for a checkpoint at ``path`` whose ``what`` could not be read."""
    return damage(path, f"reading {what} failed ({type(error).__name__}: {_cause(error)})")


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a finished sharded checkpoint (its table is written last)."""
    return (path / TABLE).is_file()


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a finished fxtrain checkpoint: orbax's or a sharded one (both are
    renamed into place last)."""
    return (path / META).is_dir() or is_sharded_checkpoint(path)


def steps(directory: Path) -> list[int]:
    """The steps of the finished checkpoints in a manager's ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and is_checkpoint(p))


def describe_directory(path: Path) -> str:
    """A few of ``path``'s entries, for error messages."""
    if not path.is_dir():
        return "a file, not a directory"
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return shown or "nothing"


def read_meta(path: Path) -> dict:
    """The JSON description of the checkpoint at ``path`` (a ``DamagedCheckpointError`` when
    it cannot be read)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not an fxtrain checkpoint (it holds: "
                         f"{describe_directory(path)})")
    file = path / TABLE if is_sharded_checkpoint(path) else path / META / JSON_ITEM
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or "leaves" not in meta:
            raise ValueError(f"{file.name} is not an fxtrain description")
        return meta
    except Exception as e:
        raise damaged(path, e, "its description (the fxtrain item)") from e


def python_leaf(entry: dict[str, Any]) -> Any:
    """The Python value a ``"python"`` leaf entry describes."""
    return float.fromhex(entry["value"]) if entry["type"] == "float" else entry["value"]
