"""One owner per workdir: the lock file ``<workdir>/.fxtrain.lock``.

A run (``fxtrain train``, ``fxtrain demo``, ``fx.train``) holds its workdir while it runs. The
lock file is created atomically (``O_CREAT | O_EXCL``) and holds the owner as JSON: ``pid``,
``host``, ``started`` and ``command``. Another run into the same workdir is refused with
``WorkdirLocked`` naming the owner and the lock; nothing in the workdir changes. A lock left by
a process that is gone (killed with SIGKILL, a crashed machine) is taken over with a warning
naming it, when the lock is of this host: its pid is not running, or is now another process's,
started after the lock was written. A lock file left empty (a run killed between creating and
writing it) is taken over too once it is ``_UNWRITTEN_STALE_S`` seconds old (writing it takes
microseconds); a younger one is refused. A lock of another host cannot be checked from here and
is refused, saying how to remove it. A lock path that is a directory, or a workdir where no file
can be created (read-only), is refused in one line naming it. The lock is released when the run
ends, by an exception too.

Examples:
    >>> import tempfile
    >>> from fxtrain.apps._workdir import WorkdirLocked, acquire, release
    >>> d = tempfile.TemporaryDirectory()
    >>> lock = acquire(d.name + "/run", "fxtrain train run.yaml")
    >>> lock.path.name, lock.owner["command"]
    ('.fxtrain.lock', 'fxtrain train run.yaml')
    >>> try:
    ...     acquire(d.name + "/run", "another run")
    ... except WorkdirLocked as e:
    ...     print(e)
    the workdir .../run is in use by fxtrain train run.yaml (pid ... on host ..., started ...);
    wait for that run to end, or give another workdir; ...
    >>> release(lock)  # removes the lock, and the folders acquire made when they are empty
    >>> import os; os.path.exists(d.name + "/run")
    False
    >>> d.cleanup()
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

LOCK_NAME = ".fxtrain.lock"
_GUARD_STALE_S = 10.0  # seconds after which a takeover's guard file is one a killed process left
_UNWRITTEN_STALE_S = 5.0  # seconds after which an empty lock file is one a killed process left


class WorkdirLocked(RuntimeError):
    """The workdir's lock cannot be taken: another run holds it (or its lock file cannot be
    read, or the workdir cannot be made); nothing was changed."""


class Lock(NamedTuple):
    """A held lock: its file, the owner written in it, and the topmost folder ``acquire``
    created for it (None: the workdir was there), which ``release`` removes when empty."""

    path: Path
    owner: dict[str, Any]
    made: Path | None


def acquire(workdir: str | os.PathLike, command: str | None = None) -> Lock:
    """Takes ``workdir``'s lock for this process (creating the workdir), or raises
    ``WorkdirLocked`` naming the run that holds it. ``command`` says what this run is (by
    default this process's command line)."""
    root = Path(workdir)
    made = _make(root)
    path = root / LOCK_NAME
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": _now(), "command": command or _command_line(), **_machine()}
    try:
        for _ in range(20):
            if _create(path, owner):
                return Lock(path, owner, made)
            held = _read(path)
            if held is None:  # released meanwhile: try again
                continue
            gone = _gone(held[1])
            if gone is None:
                raise WorkdirLocked(_refusal(path, held[1]))
            if _take_over(path, held[0]) and _create(path, owner):
                whose = "" if "unwritten" in held[1] else f" of {_who(held[1])}"
                warnings.warn(f"fxtrain: took over the lock {path}{whose}, which {gone}; that "
                              "run ended without releasing it", RuntimeWarning, stacklevel=2)
                return Lock(path, owner, made)
            time.sleep(0.1)  # another process is taking the stale lock over
        raise WorkdirLocked(f"could not lock {path}: other runs keep taking it (several runs "
                            "starting in this workdir at once?); give each its own workdir")
    except BaseException:
        _remove_empty(root, made)
        raise


def release(lock: Lock) -> None:
    """Removes ``lock``'s file if it is still this lock's, then the folders ``acquire`` made
    for it, if they are empty."""
    held = _read(lock.path)
    if held is not None and held[1] == lock.owner:
        lock.path.unlink(missing_ok=True)
    _remove_empty(lock.path.parent, lock.made)


@contextlib.contextmanager
def held(workdir: str | os.PathLike, command: str | None = None) -> Iterator[Lock]:
    """``acquire`` ... ``release`` around a block. Under torch.distributed rank 0 takes the lock
    and every rank raises its refusal."""
    from .. import distributed

    lock = distributed.rank_zero_then_broadcast(lambda: acquire(workdir, command),
                                                f"lock the workdir {workdir}")
    try:
        yield lock
    finally:
        if distributed.is_rank_zero():
            release(lock)


def _make(root: Path) -> Path | None:
    """Creates ``root`` and its missing parents; the topmost it created, or None."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    if root.exists() and not root.is_dir():
        raise WorkdirLocked(f"--workdir {root} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirLocked(f"cannot create --workdir {root}: {e.strerror or e}") from e
    return missing[-1] if missing else None


def _remove_empty(root: Path, made: Path | None) -> None:
    if made is None:
        return
    for folder in (root, *root.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote there), or gone
            return
        if folder == made:
            return


def _command_line() -> str:
    """This process's command line, as a user would type it."""
    args = list(sys.argv) or ["python"]
    if Path(args[0]).name == "__main__.py" and Path(args[0]).parent.name == "fxtrain":
        args[0:1] = ["python", "-m", "fxtrain"]
    else:
        args[0] = Path(args[0]).name
    return shlex.join(args)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _create(path: Path, owner: dict) -> bool:
    """Writes the lock file if there is none (atomically); whether it did."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:  # a read-only workdir (file system, permissions)
        raise WorkdirLocked(f"cannot create the lock file {path} ({e.strerror or e}); make "
                            f"{path.parent} writable or give another workdir. Nothing was "
                            "changed.") from None
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> tuple[bytes, dict] | None:
    """The lock file's bytes and owner; None if there is no lock file. A file still being
    written (a process between creating and writing it) is read again; one that stays
    unreadable is ``{"unwritten": its age in seconds}`` when older than
    ``_UNWRITTEN_STALE_S`` (its writer was killed), else refused with its path."""
    for _ in range(10):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise WorkdirLocked(f"the lock file {path} is a directory; remove it if no run uses "
                                f"{path.parent}, or give another workdir. Nothing was "
                                "changed.") from None
        try:
            owner = json.loads(raw)
            if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
                return raw, owner
        except ValueError:
            pass
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        age = time.time() - path.stat().st_mtime
        if age > _UNWRITTEN_STALE_S:
            return raw, {"unwritten": int(age), "empty": not raw.strip()}
    raise WorkdirLocked(f"the lock file {path} cannot be read ({raw[:80]!r}): a run may be "
                        f"starting or have died while writing it; if no run uses "
                        f"{path.parent}, delete {path} and start again")


def _machine() -> dict[str, str]:
    """(Linux) This boot of the machine and this process's pid namespace: a lock written in
    another namespace (a container with the host's hostname) names a pid this process cannot
    see, and one written before a restart names a process that is gone."""
    found = {}
    for key, read in (("boot", lambda: Path("/proc/sys/kernel/random/boot_id").read_text()),
                      ("pid_namespace", lambda: os.readlink("/proc/self/ns/pid"))):
        try:
            found[key] = read().strip()
        except OSError:
            pass
    return found


def _gone(owner: dict) -> str | None:
    """Why the lock's process no longer runs ("is not running", ...), or None: it may run
    (alive on this host, or on another host or in another container, which cannot be checked
    from here)."""
    if "unwritten" in owner:
        left = "empty" if owner.get("empty") else "unreadable"
        return f"was left {left} {owner['unwritten']} s ago by a run killed while writing it"
    if owner.get("host") != socket.gethostname():
        return None
    here = _machine()
    if owner.get("boot") and here.get("boot") and owner["boot"] != here["boot"]:
        return "is not running (the machine has restarted since)"
    if owner.get("pid_namespace") != here.get("pid_namespace") and "pid_namespace" in owner:
        return None  # another container's process: its pid means nothing here
    pid = owner["pid"]
    if pid == os.getpid():
        return None  # this very process: another run in it holds the workdir
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "is not running"
    except PermissionError:  # alive, another user's
        pass
    return _reused(pid, owner.get("started"))


def _reused(pid: int, started: str | None) -> str | None:
    """(Linux) "is not running" when ``pid`` is a zombie or a process that started after the
    lock was written (the pid was reused); None otherwise or where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        since = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
        written = datetime.datetime.fromisoformat(started).timestamp()
    except (OSError, ValueError, TypeError, IndexError, StopIteration):
        return None
    if stat[0] == "Z":
        return "is not running (a zombie)"
    if since > written + 2:  # seconds: the lock's time is whole seconds, clocks drift a little
        return f"is not running (pid {pid} is now another process, started later)"
    return None


def _take_over(path: Path, stale: bytes) -> bool:
    """Removes the stale lock whose bytes are ``stale``, if it is still there; False when
    another process is taking it over now. Only one process at a time may take over a given
    stale lock (an O_EXCL guard named by its bytes), so a new lock is never removed."""
    guard = path.with_name(f"{path.name}.{hashlib.sha256(stale).hexdigest()[:16]}.takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):  # a takeover lasts milliseconds: this guard was left
            if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:  # by a killed process
                guard.unlink()
        return False
    try:
        held = _read(path)
        if held is not None and held[0] == stale:
            path.unlink()
        return True
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def _who(owner: dict) -> str:
    return (f"{owner.get('command') or 'a run'} (pid {owner['pid']} on host "
            f"{owner.get('host')}, started {owner.get('started')})")


def _refusal(path: Path | str, owner: dict, workdir: Path | str | None = None) -> str:
    """Why the lock ``path`` of ``workdir`` (default: its folder) refuses this run."""
    workdir = path.parent if workdir is None else workdir
    here = owner.get("host") == socket.gethostname() and (
        "pid_namespace" not in owner or owner["pid_namespace"] == _machine().get("pid_namespace"))
    gone = ("if that process is gone, delete the lock file" if here else
            "if that run has ended (this machine cannot check another host's processes, or "
            "another container's), delete the lock file")
    return (f"the workdir {workdir} is in use by {_who(owner)}; wait for that run to end, "
            f"or give another workdir; {gone} {path}. Nothing was changed.")
