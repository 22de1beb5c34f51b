"""Files written whole and flushed to disk: what makes a rename into place durable, for
checkpoints, the saved config and precompiled steps alike."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """Flushes one file or directory (its entries: a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, data: bytes) -> None:
    """``data`` into ``path`` whole or not at all, on disk when it returns: written beside it,
    flushed, renamed over it (a reader never sees half a file), the rename flushed."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
