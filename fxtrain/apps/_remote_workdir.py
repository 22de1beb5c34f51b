"""A run's workdir in object storage (``fxtrain train --workdir s3://bucket/run``).

The checkpoints go straight to ``<url>/checkpoints`` (``CheckpointManager`` on the URL). The
rest of the workdir (``config.yaml``, the logs, ``step.precompiled``) is kept in a local mirror,
a temporary folder the run works in as in a local workdir: filled from the URL when the run
starts (so a resume checks its config and goes on appending to its logs), uploaded after every
checkpoint and when the run ends, then removed. A run killed between checkpoints leaves in the
URL the logs of its last checkpoint, which is where its resume starts.

One run at a time: the lock is the object ``<url>/.fxtrain.lock``, created only if absent (the
store's conditional write), holding the owner as a local lock does. A lock whose process is gone
(same host, pid not running) is taken over with a warning; any other is refused, naming it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._workdir import LOCK_NAME, WorkdirLocked, _gone, _refusal, _who

CHECKPOINTS = "checkpoints"
# what the mirror holds: the workdir's files other than the checkpoints and the lock
_SKIPPED = (CHECKPOINTS, LOCK_NAME)


class Mirror:
    """The local folder a run in ``url`` works in, and the uploads that keep ``url`` in step."""

    def __init__(self, url: str, local: Path):
        from ..checkpoint.remote import Store
        self.url = url.rstrip("/")
        self.local = local
        self.store = Store(self.url)
        self.fs, self.root = self.store.fs, self.store.root
        self._sent: dict[str, tuple[int, float]] = {}  # file -> (size, mtime) uploaded

    # -- the lock --------------------------------------------------------------------------

    def lock(self, command: str) -> None:
        """Takes ``<url>/.fxtrain.lock`` for this process, or raises ``WorkdirLocked``."""
        from ._workdir import _machine, _now
        import os
        import socket
        path = f"{self.root}/{LOCK_NAME}"
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                 "command": command, **_machine()}
        try:
            self.store.check_writable()
        except OSError as e:
            raise WorkdirLocked(f"--workdir {self.url}: {e}. Nothing was changed.") from e
        for _ in range(2):
            try:
                with self.fs.open(path, "xb") as f:  # only if absent: the store's If-None-Match
                    f.write(json.dumps(owner).encode())
                self._owner = owner
                return
            except FileExistsError:
                pass
            try:
                held = json.loads(self.fs.cat_file(path))
            except FileNotFoundError:
                continue  # released meanwhile
            except ValueError:
                raise WorkdirLocked(f"the lock {self.url}/{LOCK_NAME} cannot be read; if no "
                                    "run uses this workdir, delete it and start again. "
                                    "Nothing was changed.") from None
            gone = _gone(held)
            if gone is None:
                raise WorkdirLocked(_refusal(f"{self.url}/{LOCK_NAME}", held, self.url))
            self.fs.rm_file(path)
            warnings.warn(f"fxtrain: took over the lock {self.url}/{LOCK_NAME} of {_who(held)}, "
                          f"which {gone}; that run ended without releasing it", RuntimeWarning,
                          stacklevel=3)
        raise WorkdirLocked(f"could not lock {self.url}/{LOCK_NAME}: other runs keep taking it; "
                            "give each run its own workdir")

    def unlock(self) -> None:
        path = f"{self.root}/{LOCK_NAME}"
        with contextlib.suppress(Exception):
            if json.loads(self.fs.cat_file(path)) == self._owner:
                self.fs.rm_file(path)

    # -- the files -------------------------------------------------------------------------

    def others(self) -> list[str]:
        """The URL's entries that are not the workdir's own (another program's files)."""
        names = self.store.listing()
        return sorted(n for n in names if n not in _SKIPPED and not _ours(n))

    def fetch(self) -> None:
        """Copies the workdir's files (not the checkpoints) from the URL into the mirror."""
        for name in self.store.listing():
            if name in _SKIPPED or not _ours(name):
                continue
            source = f"{self.root}/{name}"
            if self.fs.isdir(source):
                for key in self.fs.find(source):
                    self._get(key)
            else:
                self._get(source)

    def _get(self, key: str) -> None:
        relative = key[len(self.root) + 1:]
        target = self.local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(key, str(target))
        stat = target.stat()
        self._sent[relative] = (stat.st_size, stat.st_mtime)

    def push(self) -> None:
        """Uploads the mirror's files that changed since they were last uploaded."""
        for file in sorted(self.local.rglob("*")):
            relative = str(file.relative_to(self.local))
            if not file.is_file() or relative.split("/")[0] in _SKIPPED:
                continue
            stat = file.stat()
            if self._sent.get(relative) == (stat.st_size, stat.st_mtime):
                continue
            self.fs.put_file(str(file), f"{self.root}/{relative}")
            self._sent[relative] = (stat.st_size, stat.st_mtime)


def _ours(name: str) -> bool:
    """Whether ``name`` (an entry of a workdir) is one ``fxtrain train`` writes."""
    return (name in ("config.yaml", "metrics.jsonl", "tensorboard", "step.precompiled")
            or (name.startswith("config.") and name.endswith(".yaml")))


@contextlib.contextmanager
def mirrored(url: str, command: str) -> Iterator[Mirror]:
    """The run's mirror of ``url``: locked, filled, uploaded at the end, removed. Under
    torch.distributed rank 0 locks, fetches and uploads; every rank gets a mirror folder."""
    from .. import distributed
    local = Path(tempfile.mkdtemp(prefix="fxtrain-workdir-"))
    mirror = Mirror(url, local)
    locked = False

    def start() -> None:
        nonlocal locked
        mirror.lock(command)
        locked = True
        mirror.fetch()

    try:
        distributed.rank_zero_then_broadcast(start, f"lock and read the workdir {url}")
        try:
            yield mirror
        finally:  # the logs of a run that failed are worth keeping too
            if locked:
                try:
                    mirror.push()
                except Exception as e:  # noqa: BLE001 (the run's own error matters more)
                    warnings.warn(f"fxtrain: uploading the logs to {url} failed "
                                  f"({type(e).__name__}: {e}); the checkpoints are there",
                                  RuntimeWarning, stacklevel=3)
    finally:
        if locked:
            mirror.unlock()
        shutil.rmtree(local, ignore_errors=True)


def pushed(mirror: Mirror) -> Any:
    """A host callback uploading the mirror's changed files after every checkpoint (rank 0)."""
    from .. import distributed

    def push(state: Any, event: Any) -> None:
        if event.kind == "checkpoint" and distributed.is_rank_zero():
            mirror.push()

    return push
