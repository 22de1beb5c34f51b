"""What a checkpoint directory looks like, read without torch, numpy or orbax: which entries
are finished checkpoints, and each one's JSON description (the leaf table, step, metrics,
metadata). ``fxtrain inspect`` lists checkpoints with this alone, so it starts in well under a
second; reading arrays is ``fxtrain.checkpoint.store``'s.

An orbax checkpoint ``<step>/`` holds the ``state`` item (arrays) and the ``fxtrain`` item, the
description, which orbax's JSON handler writes as ``fxtrain/metadata``; a sharded one
(``fxtrain.checkpoint.shards``) holds ``shards/`` and the description as ``fxtrain.json``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

STATE, META = "state", "fxtrain"
JSON_ITEM = "metadata"  # the file orbax's JsonCheckpointHandler writes in an item's directory
TABLE = "fxtrain.json"  # a sharded checkpoint's description, written last

# /1: descriptions without a checksum (fxtrain before 2026-11); /2: each description carries the
# CRC-32 of its own JSON (SEAL), and a sharded one the CRC-32 of every file of its shards
UNSEALED, FORMAT = "fxtrain.checkpoint/1", "fxtrain.checkpoint/2"
FORMATS = (UNSEALED, FORMAT)
SEAL = "description_crc32"


class DamagedCheckpointError(ValueError):
    """A checkpoint on disk cannot be read back as it was written: a file is missing, truncated
    or altered. The message names the checkpoint and what failed."""


class UnreadableCheckpointError(OSError):
    """A checkpoint this process cannot read now (a file it may not open, an I/O error), which
    says nothing about its contents: it is left as it is, and ``fit`` stops with the cause
    instead of falling back to an older step."""

# errors of the system, not of the bytes on disk: a checkpoint failing with one is not damaged
_NOT_DAMAGE = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
               errno.EAGAIN, errno.ETIMEDOUT}
_STORE_STATUS = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
_OS_ERROR = re.compile(r"OS error (\d+)|\[Errno (\d+)\]")


def _cause(error: BaseException) -> str:
    """The first line of a storage error, without tensorstore's JSON spec."""
    text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def damage(path: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"the checkpoint at {path} is damaged: {what}")


def _system_errno(error: BaseException | None) -> int | None:
    """The errno of a system error (permissions, I/O) behind ``error``: Python's ``OSError``s
    in its chain, or the status tensorstore and torch.distributed.checkpoint put in their
    messages; None when nothing says the system failed rather than the bytes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NOT_DAMAGE:
            return error.errno
        text = str(error)
        for match in _OS_ERROR.finditer(text):
            number = int(match.group(1) or match.group(2))
            if number in _NOT_DAMAGE:
                return number
        if "PERMISSION_DENIED: " in text:
            return errno.EACCES
        if text.startswith(_STORE_STATUS):
            return errno.EIO
        error = error.__cause__ or error.__context__
    return None


def is_system_error(error: OSError) -> bool:
    """Whether ``error`` is the system's (permissions, I/O), not the bytes'."""
    return error.errno in _NOT_DAMAGE


def unreadable(path: Path, number: int, what: str) -> UnreadableCheckpointError:
    """The error for a checkpoint at ``path`` the system would not let this process read;
    ``what`` (also its attribute ``what``, with the cause) says which part."""
    error = UnreadableCheckpointError(
        number, f"cannot read the checkpoint at {path}: {what} ({os.strerror(number)}). This "
                "is not damage, so nothing was set aside or skipped: make it readable (or fix "
                "the disk) and run again")
    error.what = f"{what} ({os.strerror(number)})"
    return error


def refused(path: Path, error: OSError) -> UnreadableCheckpointError:
    """``error`` (opening part of the checkpoint at ``path``) as an
    ``UnreadableCheckpointError``; raises it again when it is not the system's."""
    if not is_system_error(error):
        raise error
    return unreadable(path, error.errno, f"{error.filename} cannot be opened")


def damaged(path: Path, error: BaseException,
            what: str) -> DamagedCheckpointError | UnreadableCheckpointError:
    """The error for a checkpoint at ``path`` whose ``what`` could not be read: an
    ``UnreadableCheckpointError`` when the system failed, not the bytes."""
    failed = f"reading {what} failed ({type(error).__name__}: {_cause(error)})"
    number = _system_errno(error)
    return damage(path, failed) if number is None else unreadable(path, number, failed)


def check_readable(path: Path) -> None:
    """Raises ``UnreadableCheckpointError`` naming the first file or folder under ``path``
    this process may not open (before any read could mistake it for damage)."""
    def fail(error: OSError) -> None:
        raise refused(path, error) from error

    for root, dirs, files in os.walk(path, onerror=fail):
        for name in files:
            try:
                os.close(os.open(os.path.join(root, name), os.O_RDONLY))
            except FileNotFoundError:
                continue  # gone meanwhile (a retention delete): the read names it if it matters
            except OSError as e:
                fail(e)


def _canonical(meta: dict) -> bytes:
    """The description as the checksum covers it: its JSON with sorted keys, without the seal."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != SEAL}))
    return json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()


def sealed(meta: dict) -> dict:
    """``meta`` with the CRC-32 of its own JSON, so that an altered description is named as
    damage (orbax's JSON item has no checksum of its own)."""
    return {**meta, "format": FORMAT, SEAL: zlib.crc32(_canonical({**meta, "format": FORMAT}))}


def check_seal(path: Path, meta: dict) -> None:
    """Raises ``DamagedCheckpointError`` when ``meta`` differs from what was written."""
    if SEAL not in meta:
        if meta.get("format") != UNSEALED:  # a sealed format always carries its seal
            raise damage(path, f"its description has no checksum (format "
                               f"{meta.get('format')!r})")
        return
    if meta[SEAL] != zlib.crc32(_canonical(meta)):
        raise damage(path, "its description (the fxtrain item) differs from what was saved "
                           "(CRC-32 mismatch)")


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
    found = []
    for p in directory.iterdir():
        try:
            if p.name.isdigit() and is_checkpoint(p):
                found.append(int(p.name))
        except OSError as e:  # a folder this process may not enter: a step, named when read
            if not is_system_error(e):
                raise
            found.append(int(p.name))
    return sorted(found)


def step_path(directory: Path, step: int | None = None) -> Path:
    """The checkpoint of ``step`` (None: the newest) in a manager's ``directory``; raises
    ``FileNotFoundError`` saying what the directory holds instead."""
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    found = steps(directory)
    if not found:
        raise FileNotFoundError(f"no fxtrain checkpoints in {directory} (it holds: "
                                f"{describe_directory(directory)})")
    return directory / str(chosen_step(found, step, directory))


def chosen_step(found: list[int], step: int | None, where: Any) -> int:
    """``step`` (None: the newest) among the steps ``found`` in ``where`` (a folder or a URL),
    or a ``FileNotFoundError`` naming what there is."""
    if not found:
        raise FileNotFoundError(f"no fxtrain checkpoints in {where}")
    if step is None:
        return found[-1]
    if step not in found:
        raise FileNotFoundError(f"no checkpoint of step {step} in {where}; "
                                f"available steps: {found}")
    return step


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
    try:
        found = is_checkpoint(path)
    except OSError as e:
        raise refused(path, e) from e
    if not found:
        raise ValueError(f"{path} is not an fxtrain checkpoint (it holds: "
                         f"{describe_directory(path)})")
    file = path / TABLE if is_sharded_checkpoint(path) else path / META / JSON_ITEM
    try:
        raw = file.read_bytes()
    except Exception as e:
        raise damaged(path, e, "its description (the fxtrain item)") from e
    return parse_meta(path, raw)


def parse_meta(path: Any, raw: bytes) -> dict:
    """The description of the checkpoint at ``path`` from its JSON bytes, checked against its
    seal (a ``DamagedCheckpointError`` when it cannot be read as written)."""
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict) or "leaves" not in meta:
            raise ValueError("it is not an fxtrain description")
    except Exception as e:
        raise damaged(path, e, "its description (the fxtrain item)") from e
    check_seal(path, meta)
    return meta


def python_leaf(entry: dict[str, Any]) -> Any:
    """The Python value a ``"python"`` leaf entry describes."""
    return float.fromhex(entry["value"]) if entry["type"] == "float" else entry["value"]
