"""One owner per workdir (``fxtrain.apps._workdir``): the lock file names its owner, a live owner or
one on another host is refused, a dead owner's lock is taken over with a warning, and the lock
goes when the run ends, by an exception too. Several processes racing for one lock (a fresh
one, or a stale one) leave exactly one owner."""

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

from fxtrain.apps._workdir import LOCK_NAME, WorkdirLocked, _take_over, acquire, held, release
from helpers_apps import write_lock


def test_the_lock_names_its_owner_and_goes_with_the_folders_it_made(tmp_path):
    lock = acquire(tmp_path / "a" / "b", "fxtrain train run.yaml")
    owner = json.loads(lock.path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["command"] == "fxtrain train run.yaml" and owner["started"]
    release(lock)
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ were made for the lock: removed


def test_a_live_owner_is_refused_with_its_pid_host_and_the_lock_path(tmp_path):
    path = write_lock(tmp_path)  # our parent process: alive, on this host
    before = path.read_bytes()
    with pytest.raises(WorkdirLocked) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert f"pid {os.getppid()} on host {socket.gethostname()}" in message
    assert "fxtrain train old.yaml" in message and str(path) in message
    assert "give another workdir" in message and "Nothing was changed" in message
    assert path.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_pid_reused_by_a_later_process_is_a_dead_owner(tmp_path):
    write_lock(tmp_path, started="2001-01-01T00:00:00+00:00")  # our parent started later
    with pytest.warns(RuntimeWarning, match="is now another process, started later"):
        release(acquire(tmp_path))


def test_an_unreadable_lock_is_refused_saying_what_to_do(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a process died between creating and writing it
    with pytest.raises(WorkdirLocked, match="cannot be read.*delete"):
        acquire(tmp_path)


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    lock = acquire(tmp_path)
    path = write_lock(tmp_path, command="someone else")  # e.g. a takeover after a long pause
    release(lock)
    assert json.loads(path.read_text())["command"] == "someone else"


def test_held_releases_on_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError), held(tmp_path / "w") as lock:
        assert lock.path.exists()
        1 / 0
    assert not (tmp_path / "w").exists()


def test_fxtrain_demo_takes_the_lock_too(tmp_path, capsys):
    from fxtrain import cli

    with held(tmp_path / "demo", "a run of the test") as lock:
        status = cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--steps", "1",
                           "--no-progress", "--no-compile"])
        err = capsys.readouterr().err
        assert status == 2 and err.startswith(f"fxtrain demo: the workdir {tmp_path / 'demo'} "
                                              "is in use by a run of the test (pid "
                                              f"{os.getpid()} on host")
        assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [LOCK_NAME]
        assert json.loads(lock.path.read_text())["command"] == "a run of the test"
    status = cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--steps", "1",
                       "--no-progress", "--no-compile"])
    assert status == 0 and not (tmp_path / "demo" / LOCK_NAME).exists()


def test_an_empty_lock_older_than_a_few_seconds_is_taken_over_with_a_warning(tmp_path):
    """Issue 60, hole 8: a run killed between creating the lock and writing it left an empty
    lock that every later run refused until a person deleted it (a requeue loop stopped there).
    Fresh, it may be a run writing it now: refused (above); seconds old, taken over."""
    path = tmp_path / LOCK_NAME
    path.write_text("")
    old = time.time() - 30
    os.utime(path, (old, old))
    with pytest.warns(RuntimeWarning, match=f"took over the lock {path}, which was left empty "
                                            "30 s ago by a run killed while writing it"):
        lock = acquire(tmp_path, "new run")
    assert json.loads(path.read_text())["command"] == "new run"
    release(lock)


def test_a_lock_that_is_a_directory_or_a_read_only_workdir_is_one_clear_error(tmp_path,
                                                                               monkeypatch):
    """Issue 60, hole 8: raw tracebacks (IsADirectoryError, PermissionError) before."""
    (tmp_path / "a" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(WorkdirLocked, match=f"the lock file {tmp_path / 'a' / LOCK_NAME} is a "
                                            "directory; remove it if no run uses .*, or give "
                                            "another workdir. Nothing was changed."):
        acquire(tmp_path / "a")
    assert (tmp_path / "a" / LOCK_NAME).is_dir()
    (tmp_path / "b").mkdir()
    opened = os.open

    def read_only(path, flags, *args):  # as root, chmod does not stop a write: a read-only fs
        if str(path).endswith(LOCK_NAME) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return opened(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WorkdirLocked, match=f"cannot create the lock file "
                                            f"{tmp_path / 'b' / LOCK_NAME} \\(Read-only file "
                                            "system\\); make .* writable or give another workdir"):
        acquire(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []
