"""Reading and writing one checkpoint directory with orbax: the ``state`` item (numpy arrays) and
the ``fxtrain`` item (JSON metadata). orbax is imported here, lazily, and nowhere else."""

from __future__ import annotations

import functools
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import bridge, shards
from .files import fsync_path
from .layout import (META, STATE, DamagedCheckpointError, UnreadableCheckpointError,  # noqa: F401
                     check_readable, damage, damaged, describe_directory, is_checkpoint,
                     read_meta, sealed, steps)

def _quiet_closed_loops() -> None:
    """After a failed read, tensorstore's other reads still finish and call back into the event
    loop orbax ran them on, which is closed by then: each prints 'Event loop is closed' as an
    unraisable exception, burying the real error. Those (and only those) are dropped. Installed
    when orbax is first imported: the late callbacks may fire before the failure reaches
    fxtrain's handler (installing it there lost that race now and then)."""
    previous = sys.unraisablehook
    if getattr(previous, "_fxtrain_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._fxtrain_quiet = True
    sys.unraisablehook = hook


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(arr.reshape(-1).view(np.uint8))


def with_checksums(arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """``meta`` with each stored array's CRC-32 in its leaf entry (orbax stores arrays without
    one: a flipped byte would restore silently)."""
    leaves = [{**e, "crc32": _crc(arrays[e["key"]])} if e.get("key") in arrays else e
              for e in meta["leaves"]]
    return {**meta, "leaves": leaves}


def verify_arrays(path: Path, arrays: dict[str, Any], meta: dict) -> None:
    """Raises ``DamagedCheckpointError`` naming the first leaf whose bytes differ from their
    saved checksum (checkpoints written before checksums were kept pass)."""
    for e in meta["leaves"]:
        arr = arrays.get(e.get("key"))
        if "crc32" in e and isinstance(arr, np.ndarray) and _crc(
                np.ascontiguousarray(arr)) != e["crc32"]:
            raise damage(path, f"the stored bytes of {e['path']} (array {e['key']}) differ "
                                "from what was saved (CRC-32 mismatch)")


@functools.cache
def orbax():
    """``orbax.checkpoint``, imported on first use (it imports jax)."""
    import logging

    import orbax.checkpoint as ocp
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax narrates every save at WARNING
    _quiet_closed_loops()
    return ocp


def handlers() -> dict[str, Any]:
    """The item handlers: arrays without compression (zstd halves load speed for ~8% space on
    float data) and without orbax's defensive copy (the arrays are views of the state's
    tensors, which a functional loop never modifies), metadata as JSON."""
    ocp = orbax()
    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(
        deepcopy_host_arrays=False)))
    return {STATE: ocp.PyTreeCheckpointHandler(use_compression=False,
                                               type_handler_registry=registry),
            META: ocp.JsonCheckpointHandler()}


@functools.cache
def _checkpointer():
    ocp = orbax()
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers()))


def read_arrays(path: Path, keys: list[str], saved: list[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the checkpoint at ``path`` (``saved``: all the keys it holds);
    a sharded checkpoint's tensors come whole, as tensors."""
    if shards.is_sharded_checkpoint(path):
        return shards.read(path, read_meta(path), keys)
    ocp = orbax()
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    partial = set(keys) != set(saved)
    item = {k: np.empty(0) for k in keys}
    restore = ocp.args.PyTreeRestore(item=item, restore_args={k: as_numpy for k in keys},
                                     partial_restore=partial)
    try:
        return _checkpointer().restore(path, args=ocp.args.Composite(**{STATE: restore}))[STATE]
    except Exception as e:
        raise damaged(path, e, f"its arrays (the {STATE} item)") from e


def meta_for(state: Any, arrays_meta: dict, metrics: dict | None, metadata: dict | None) -> dict:
    """The JSON item: the bridge's leaf table plus step, time, versions, metrics and metadata,
    and what ``fxtrain export`` needs of a transformers model (``model.describe``)."""
    from .._version import __version__
    from .model import describe
    model = describe(state)
    return {**arrays_meta, "step": int(state.step) if hasattr(state, "step") else None,
            "time": time.time(), "fxtrain_version": __version__,
            "torch_version": torch.__version__, "metrics": metrics or {},
            "metadata": metadata or {}, **({"model": model} if model else {})}


def composite(arrays: dict, meta: dict):
    """orbax's save arguments for one checkpoint: its arrays, and ``meta`` with their checksums,
    sealed with its own."""
    ocp = orbax()
    items = {META: ocp.args.JsonSave(sealed(with_checksums(arrays, meta)))}
    if arrays:  # orbax refuses an empty tree; a state of Python values only has no array item
        items[STATE] = ocp.args.PyTreeSave(arrays)
    return ocp.args.Composite(**items)


def write(path: Path, arrays: dict, meta: dict) -> None:
    """Writes one checkpoint at ``path`` synchronously (into a temporary name, renamed last)."""
    _checkpointer().save(path, args=composite(arrays, meta))
    fsync_tree(path)


def fsync_tree(path: Path) -> None:
    """Flushes every file and directory under ``path`` to disk, and ``path``'s parent (the
    rename into place)."""
    for root, _, files in os.walk(path):
        for name in files + ["."]:
            fsync_path(os.path.join(root, name))
    fsync_path(path.parent)


def saved_keys(meta: dict) -> list[str]:
    return [e["key"] for e in meta["leaves"] if "key" in e]


def restore_from(path: Path, like: Any, *, only=None,
                 cast: bool = False) -> tuple[Any, bridge.Plan]:
    """Reads the checkpoint at ``path`` into a state shaped like ``like``."""
    meta = read_meta(path)
    p = bridge.plan(meta, like, only=only, cast=cast)
    if shards.is_sharded_checkpoint(path):  # each template DTensor reads its own shards (its
        likes = {e["key"]: leaf for _, leaf, e in p.sources  # files checked by every rank at
                 if e is not None and "key" in e}  # once, in read: none fails alone)
        load = lambda keys: shards.read(path, meta, keys, likes)  # noqa: E731
    else:
        check_readable(path)

        def load(keys):
            arrays = read_arrays(path, keys, saved_keys(meta))
            verify_arrays(path, arrays, meta)
            return arrays
    try:
        return bridge.decode(p, load), p
    except DamagedCheckpointError:
        raise
    except ValueError as e:  # a stored array of another shape than its description
        raise damaged(path, e, "its arrays") from e


def verify(path: Path) -> dict:
    """Reads the checkpoint at ``path`` completely (its description, every array, their
    checksums); returns its description, or raises ``DamagedCheckpointError``."""
    return read_all(path)[0]


def read_all(path: Path) -> tuple[dict, dict[str, Any]]:
    """The description and every stored array (a sharded checkpoint's as whole tensors) of the
    checkpoint at ``path``, checked against the checksums and shapes it was saved with."""
    meta = read_meta(path)
    keys = saved_keys(meta)
    if shards.is_sharded_checkpoint(path):
        if not keys:
            shards.verify_files(path, meta)
            return meta, {}
        return meta, shards.read(path, meta, keys)
    check_readable(path)
    if not keys:
        return meta, {}
    arrays = read_arrays(path, keys, keys)
    verify_arrays(path, arrays, meta)
    for e in meta["leaves"]:
        arr = arrays.get(e.get("key"))
        if arr is not None and list(np.shape(arr)) != e["shape"]:
            raise damage(path, f"{e['path']} has shape {tuple(np.shape(arr))} on disk, "
                                f"{tuple(e['shape'])} in its description")
    return meta, arrays
