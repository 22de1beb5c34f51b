"""Files written whole and flushed to disk: what makes a rename into place durable, for
checkpoints, the saved config and precompiled steps alike."""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

_CHUNK = 16 * 2**20  # bytes read at a time for a checksum


def fsync_path(path: Path | str) -> None:
    """Flushes one file or directory (its entries: a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc(path: Path | str) -> int:
    """The CRC-32 of a file's bytes, read a chunk at a time."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


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
