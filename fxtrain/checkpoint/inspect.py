"""What a checkpoint directory holds, without a template state: the checkpoints (step, metrics,
size, age), one checkpoint's tree (paths, dtypes, shapes) and its digest.

The digest is ``fx.tree_digest`` of the state the checkpoint restores to, computed from the
stored bytes: restoring into the right template and hashing gives the same string. Only it reads
arrays (torch, orbax); the rest reads the JSON descriptions (``fxtrain.checkpoint.layout``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import layout


def checkpoint_paths(directory: str | Path) -> list[Path]:
    """The finished checkpoints under ``directory`` (a manager's, or a run's workdir holding a
    ``checkpoints`` folder), or ``directory`` itself.

    Examples:
        >>> import tempfile
        >>> from fxtrain.checkpoint import inspect
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> with fx.checkpoint.CheckpointManager(tmp.name, async_save=False) as manager:
        ...     manager.save(state)
        ...     manager.save(state.replace(step=state.step + 5))
        True
        True
        >>> [p.name for p in inspect.checkpoint_paths(tmp.name)]
        ['0', '5']
        >>> tmp.cleanup()
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if layout.is_checkpoint(directory):
        return [directory]
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    found = layout.steps(directory)
    if not found and (directory / "checkpoints").is_dir():  # a run's workdir (fxtrain demo's)
        return checkpoint_paths(directory / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no fxtrain checkpoints in {directory} (it holds: "
                                f"{layout.describe_directory(directory)})")
    return [directory / str(step) for step in found]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary(path: Path, verify: bool = False) -> dict[str, Any]:
    """Step, metrics, bytes on disk and save time of the checkpoint at ``path``, and
    ``damaged``: why it cannot be read back as written, or None (``verify``: every array read
    and checked, not only its description); ``unreadable``: which file this process may not
    read (permissions, an I/O error), or None."""
    try:
        if verify:
            from . import store  # every array read: torch, numpy and orbax
            meta = store.verify(path)
        else:
            meta = layout.read_meta(path)
    except (layout.DamagedCheckpointError, layout.UnreadableCheckpointError) as e:
        step = int(path.name) if path.name.isdigit() else None
        damaged = isinstance(e, layout.DamagedCheckpointError)
        why = str(e).split(" is damaged: ", 1)[-1] if damaged else e.what
        return {"path": path, "step": step, "metrics": {}, "size": _size(path), "time": None,
                "meta": None, "damaged": why if damaged else None,
                "unreadable": None if damaged else why}
    return {"path": path, "step": meta.get("step"), "metrics": meta.get("metrics", {}),
            "size": _size(path), "time": meta.get("time"), "meta": meta, "damaged": None,
            "unreadable": None}


def remote_summaries(url: str, verify: bool = False) -> list[dict[str, Any]]:
    """``summary`` of every checkpoint in object storage under ``url`` (a manager's directory,
    or a run's workdir holding ``checkpoints``): each one's description, its size from its
    commit; ``verify`` downloads and checks every file and array."""
    from . import remote
    where = remote.Store(url)
    steps = where.steps()
    if not steps:
        inner = remote.Store(f"{where.url}/checkpoints")
        where, steps = (inner, inner.steps()) if inner.steps() else (where, steps)
    if not steps:
        raise FileNotFoundError(f"no fxtrain checkpoints in {url}")
    rows = []
    for step in steps:
        path = where.url / str(step)
        try:
            commit = where.commit_of(step)
            size = sum(size for size, _ in commit["files"].values())
            if verify:
                from . import store  # every array read: torch, numpy and orbax
                with remote.local_copy(where.url, step) as local:
                    meta = store.verify(local)
            else:
                meta = where.read_meta(step)
        except (layout.DamagedCheckpointError, layout.UnreadableCheckpointError) as e:
            damaged = isinstance(e, layout.DamagedCheckpointError)
            why = str(e).split(" is damaged: ", 1)[-1] if damaged else \
                getattr(e, "what", str(e))
            rows.append({"path": path, "step": step, "metrics": {}, "size": 0, "time": None,
                         "meta": None, "damaged": why if damaged else None,
                         "unreadable": None if damaged else why})
            continue
        rows.append({"path": path, "step": meta.get("step"), "metrics": meta.get("metrics", {}),
                     "size": size, "time": meta.get("time"), "meta": meta, "damaged": None,
                     "unreadable": None})
    return rows


def leaf_rows(meta: dict) -> list[tuple[str, str, str]]:
    """``(path, dtype, shape)`` for every leaf; Python values show their value.

    Examples:
        >>> import pathlib, tempfile
        >>> from fxtrain.checkpoint import inspect
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> path = fx.checkpoint.save(pathlib.Path(tmp.name) / "ckpt", state)
        >>> for row in inspect.leaf_rows(inspect.summary(path)["meta"]):
        ...     print(*row)
        .step int64 ()
        .params['weight'] float32 (1, 2)
        .params['bias'] float32 (1,)
        .buffers NoneType None
        .opt_state[0].count int64 ()
        .opt_state[0].learning_rate float32 ()
        .rng int64 ()
        .data NoneType None
        .callbacks NoneType None
        >>> tmp.cleanup()
    """
    rows = []
    for e in meta["leaves"]:
        if e["kind"] == "python":
            rows.append((e["path"], e["type"], repr(layout.python_leaf(e))))
        else:
            rows.append((e["path"], e["dtype"], str(tuple(e["shape"]))))
    return rows


def digest(path: Path) -> str:
    """``fx.tree_digest`` of the state the checkpoint at ``path`` restores to: the stored leaves,
    rebuilt on the CPU in their stored dtypes, hashed as ``tree_digest`` hashes leaves.

    Examples:
        >>> import pathlib, tempfile
        >>> from fxtrain.checkpoint import inspect
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.adamw(1e-3))
        >>> path = fx.checkpoint.save(pathlib.Path(tmp.name) / "ckpt", state)
        >>> inspect.digest(path) == fx.tree_digest(state)  # no template needed
        True
        >>> tmp.cleanup()
    """
    from ..tree import digest_items, leaf_record
    from . import bridge, remote, store

    if remote.is_url(path):
        with remote.local_copy(path) as local:
            return digest(local)
    meta, arrays = store.read_all(path)
    return digest_items(leaf_record(e["path"], bridge.leaf_value(arrays.get(e.get("key")), e))
                        for e in sorted(meta["leaves"], key=lambda e: e["path"]))


def format_size(n: int) -> str:
    """``n`` bytes for people: B, KB, MB or GB with one decimal.

    Examples:
        >>> from fxtrain.checkpoint.inspect import format_size
        >>> format_size(512), format_size(1536), format_size(3 * 2**30)
        ('512 B', '1.5 KB', '3.0 GB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_age(saved_at: float | None, now: float | None = None) -> str:
    """How long ago ``saved_at`` (a ``time.time()``) was, in the largest unit that fits.

    Examples:
        >>> from fxtrain.checkpoint.inspect import format_age
        >>> format_age(1000.0, now=1042.0), format_age(0.0, now=7200.0), format_age(None)
        ('42s ago', '2.0h ago', '?')
    """
    if saved_at is None:
        return "?"
    seconds = max(0.0, (now or time.time()) - saved_at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"
