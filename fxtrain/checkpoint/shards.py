"""Sharded checkpoints of a sharded state (``fx.shard``), on ``torch.distributed.checkpoint``.

Every rank writes its own shards, in parallel, and nothing is gathered: a checkpoint directory
holds ``shards/`` (torch.distributed.checkpoint's files: one ``__<rank>_0.distcp`` per rank and
a ``.metadata``; a tensor whole on every rank is written once, by one of them) and
``fxtrain.json``, the same leaf table as an orbax checkpoint (``fxtrain.checkpoint.bridge``)
with the step, metrics and metadata. It is written under ``<name>.fxtrain-tmp`` and renamed into
place by rank 0 once every rank's shards and the table are on disk, so a job killed mid-save
leaves nothing that looks finished.

Reading needs no process group and restores onto any number of ranks: the template's DTensors
take their own shards (resharded from however many ranks wrote them), its plain tensors the
whole values.

torch.distributed.checkpoint keeps no checksums, so the table records each file of ``shards/``
with its size and CRC-32 (each rank checksums the files it wrote, rank 0 the shared
``.metadata``), and every file is checked before anything is read from them: a flipped bit or a
truncated shard is a ``DamagedCheckpointError`` naming the file, never other values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from .files import file_crc, fsync_path
from .layout import (TABLE, UnreadableCheckpointError, check_readable, damage,  # noqa: F401
                     damaged, is_sharded_checkpoint, sealed)

SHARDS, TMP = "shards", ".fxtrain-tmp"
STORAGE = "torch.distributed.checkpoint"
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # the files rank N writes; others: rank 0's


def _alone() -> bool:
    """Whether there is no process group: torch.distributed.checkpoint then reads and writes
    as one process (it warns that it assumes so; here that is the intent)."""
    if distributed.initialized():
        return False
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return True


def _stored(value: Any) -> torch.Tensor:
    """What torch.distributed.checkpoint stores for a leaf: a tensor (numpy arrays as tensors)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value.detach()


def _own_checksums(folder: Path) -> dict[str, list[int]]:
    """``{name: [size, crc32]}`` of the files of ``folder`` this rank wrote (all of them
    without a process group): each rank reads back its own files only."""
    def owner(name: str) -> int:
        match = _RANK_FILE.fullmatch(name)
        return int(match.group(1)) if match else 0

    alone = _alone()
    return {p.name: [p.stat().st_size, file_crc(p)] for p in sorted(folder.iterdir())
            if p.is_file() and (alone or owner(p.name) == distributed.rank())}


def _gathered(mine: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every rank's ``_own_checksums`` in one table (a collective under a process group)."""
    if _alone():
        return mine
    return {name: v for part in distributed.all_gather(mine) for name, v in part.items()}


def _check_files(path: Path, files: dict[str, list[int]] | None) -> Exception | None:
    """The error of the shard files of ``files`` (this rank's share of them under a process
    group): a ``DamagedCheckpointError`` or an ``UnreadableCheckpointError``; None when intact."""
    try:
        check_readable(path)
        names = sorted(files or ())  # none: written before checksums were kept
        if not _alone():
            names = names[distributed.rank()::distributed.world_size()]
        for name in names:
            size, crc = files[name]
            file = path / SHARDS / name
            if not file.is_file():
                return damage(path, f"its shard file {SHARDS}/{name} is missing")
            if file.stat().st_size != size:
                return damage(path, f"its shard file {SHARDS}/{name} holds "
                                    f"{file.stat().st_size} bytes, {size} were written "
                                    "(truncated or altered)")
            if file_crc(file) != crc:
                return damage(path, f"the bytes of its shard file {SHARDS}/{name} differ from "
                                    "what was written (CRC-32 mismatch)")
    except UnreadableCheckpointError as e:
        return e
    except OSError as e:  # a read failing midway (EIO), or a file gone meanwhile
        return damaged(path, e, "its shard files")
    return None


def verify_files(path: Path, meta: dict) -> None:
    """Raises ``DamagedCheckpointError`` naming the first shard file whose size or checksum
    differs from the table's (checkpoints written before checksums were kept pass), or
    ``UnreadableCheckpointError`` for one this process may not read. Under a process group
    every rank calls it, checks a share of the files, and all raise together: a rank that
    failed alone would leave the others waiting in torch.distributed.checkpoint's collectives."""
    problem = _check_files(path, meta.get("files"))
    if not _alone():
        problem = next((p for p in distributed.all_gather(problem) if p), None)
    if problem is not None:
        raise problem


def _together(error: Exception | None) -> None:
    """Raises on every rank the first rank's ``error`` (None where a rank's step succeeded):
    a rank that raised alone would leave the others waiting in the next collective."""
    if not _alone():
        error = next((e for e in distributed.all_gather(error) if e is not None), None)
    if error is not None:
        raise error


def background_group() -> Any:
    """A gloo group of its own for the collectives of saves written in the background, so they
    never interleave with the training's on the default group (every rank makes it, in the same
    order; its owner destroys it with ``torch.distributed.destroy_process_group``: a gloo group
    left to the interpreter's teardown can abort the process)."""
    return torch.distributed.new_group(backend="gloo")


def write(path: Path, values: dict[str, Any], meta: dict,
          finish: Callable[[], None] | None = None,
          background: Any = None, store: Any = None) -> Callable[[], None] | None:
    """Writes the sharded checkpoint ``path`` from every rank (a collective).

    ``values``: this rank's leaves by key (``bridge.table``); ``meta``: the JSON table, written
    by rank 0. ``finish`` runs on rank 0 after the rename (retention). An error on any rank
    raises on every rank, naming the checkpoint, and leaves the older checkpoints intact.

    ``background``: a process group (``background_group()``) to write in a thread with:
    returns once this rank's shards are copied (the state may change in place right after);
    this rank's files are checksummed on the writer's thread as soon as they are written, and
    the returned ``complete()``, called by every rank, waits for both, gathers the checksums
    and puts the checkpoint in place.

    ``store``: a ``remote.Store`` to write to instead: ``path`` is then this rank's own local
    staging folder (named by the step), each rank uploads the files it wrote as soon as they
    are written, and rank 0 uploads the table and commits the step once every rank's are up.
    """
    import torch.distributed.checkpoint as dcp
    tmp = path.with_name(path.name + TMP)
    target = path if store is None else store.url / path.name

    def start() -> None:
        if tmp.exists():  # left by a job killed while writing this checkpoint
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)

    def failed(e: Exception) -> OSError:
        return OSError(f"writing the sharded checkpoint {target} failed (the older checkpoints "
                       f"are intact): {e}")

    def done(files: dict[str, list[int]]) -> None:
        with open(tmp / TABLE, "w") as f:
            json.dump(sealed({**meta, "storage": STORAGE, "world_size": distributed.world_size(),
                              "files": files}), f)
            f.flush()
            os.fsync(f.fileno())
        if store is not None:  # the table, then the commit that makes the step visible
            store.upload(tmp, path.name, [TABLE])
            store.commit(path.name, {**{f"{SHARDS}/{n}": v for n, v in files.items()},
                                     TABLE: [(tmp / TABLE).stat().st_size,
                                             file_crc(tmp / TABLE)]})
        else:
            fsync_path(tmp / SHARDS)
            fsync_path(tmp)
            os.rename(tmp, path)
            fsync_path(path.parent)
        if finish is not None:
            finish()

    def uploaded(mine: dict[str, list[int]]) -> dict[str, list[int]]:
        """This rank's files, uploaded when writing to a store."""
        if store is not None:
            store.upload(tmp, path.name, [f"{SHARDS}/{n}" for n in mine])
        return mine

    def finished(files: dict[str, list[int]]) -> None:
        try:
            distributed.rank_zero_then_broadcast(lambda: done(files),
                                                 f"finish the sharded checkpoint {target}")
        finally:
            if store is not None:  # each rank's staging folder is its own
                shutil.rmtree(tmp, ignore_errors=True)

    if store is None:
        distributed.rank_zero_then_broadcast(start, f"create {tmp}")
    else:  # every rank stages in its own folder
        try:
            start()
            error = None
        except OSError as e:
            error = OSError(f"cannot create the staging folder {tmp}: {e}")
        _together(error)
    writer = dcp.FileSystemWriter(tmp / SHARDS, sync_files=True)
    if background is None or _alone():
        try:
            dcp.save({k: _stored(v) for k, v in values.items()}, storage_writer=writer,
                     no_dist=_alone())
        except Exception as e:
            raise failed(e) from e
        try:
            mine = uploaded(_own_checksums(tmp / SHARDS))
            error = None
        except Exception as e:  # noqa: BLE001 (raised on every rank below)
            mine, error = {}, failed(e)
        _together(error)
        finished(_gathered(mine))
        return None
    snapshot = {k: _stored(v).clone() for k, v in values.items()}  # a donating step's next
    future = dcp.async_save(snapshot, storage_writer=writer,  # write can't reach these
                            process_group=background)
    mine: Future = Future()  # this rank's checksums, read back on the writer's thread too

    def checksum(written: Future) -> None:
        try:
            written.result()
            mine.set_result(uploaded(_own_checksums(tmp / SHARDS)))
        except BaseException as e:  # noqa: BLE001 (handed to complete, on the training thread)
            mine.set_exception(e)

    future.add_done_callback(checksum)

    def complete() -> None:
        try:
            files, error = mine.result(), None
        except Exception as e:  # noqa: BLE001 (raised on every rank below)
            files, error = {}, failed(e)
        _together(error)
        finished(_gathered(files))

    return complete


def _target(entry: dict, like: Any) -> torch.Tensor:
    """An empty tensor for torch.distributed.checkpoint to read ``entry`` into: a DTensor laid
    out as ``like`` (this rank's shard only) or a whole CPU tensor, in the saved dtype."""
    from ..distributed import is_dtensor
    from .bridge import torch_dtype
    dtype = torch.from_numpy(np.empty(0, entry["dtype"])).dtype if entry["kind"] == "ndarray" \
        else torch_dtype(entry["dtype"])
    if is_dtensor(like):
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(entry["shape"], dtype=dtype)


def read(path: Path, meta: dict, keys: list[str], likes: dict[str, Any] | None = None, *,
         verify: bool = True) -> dict[str, Any]:
    """The leaves ``keys`` of the sharded checkpoint at ``path`` (``meta``: its table), once
    its files are checked against their checksums (``verify=False``: checked already, by a
    reader that reads a few keys at a time).

    ``likes`` maps keys to template leaves: a DTensor there is read as its own shards. Without a
    process group every value is read whole; with one, every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    if verify:
        verify_files(path, meta)
    entries = {e["key"]: e for e in meta["leaves"] if e.get("key") in set(keys)}
    likes = likes or {}
    targets = {k: _target(e, likes.get(k)) for k, e in entries.items()}
    try:
        dcp.load(targets, checkpoint_id=path / SHARDS, no_dist=_alone())
    except (Exception, dcp.CheckpointException) as e:  # the latter is not an Exception
        raise damaged(path, e, "its shards") from e
    return {k: t.numpy() if entries[k]["kind"] == "ndarray" else t for k, t in targets.items()}
