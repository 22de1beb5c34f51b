"""test_workdir's tests that run processes (the rest: tests/unit/test_workdir.py)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
import pytest
from fxtrain.apps._workdir import LOCK_NAME, WorkdirLocked, _take_over, acquire, held, release
from helpers_apps import RACER, dead_pid, write_lock


def test_another_hosts_lock_is_refused_saying_it_cannot_be_checked(tmp_path):
    path = write_lock(tmp_path, pid=dead_pid(), host="elsewhere.example")
    with pytest.raises(WorkdirLocked, match="on host elsewhere.example") as refused:
        acquire(tmp_path)
    assert "cannot check another host" in str(refused.value) and str(path) in str(refused.value)


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with pytest.warns(RuntimeWarning, match=f"took over the lock .* of fxtrain train old.yaml "
                                            f"\\(pid {pid} on host"):
        lock = acquire(tmp_path, "new run")
    assert json.loads(lock.path.read_text())["command"] == "new run"
    release(lock)
    assert not lock.path.exists() and tmp_path.exists()  # the workdir was there: kept


def test_a_takeover_under_way_is_left_to_the_process_doing_it(tmp_path):
    path = write_lock(tmp_path, pid=dead_pid())
    stale = path.read_bytes()
    guard = path.with_name(f"{LOCK_NAME}.{hashlib.sha256(stale).hexdigest()[:16]}.takeover")
    guard.write_text("")
    assert not _take_over(path, stale) and path.read_bytes() == stale
    guard.unlink()
    assert _take_over(path, stale) and not path.exists()


def test_a_takeover_guard_left_by_a_killed_process_is_cleared(tmp_path):
    """A process killed while taking a stale lock over leaves its guard file; a later run
    clears it (after 10 s, far beyond a takeover's milliseconds) and takes the lock."""
    path = write_lock(tmp_path, pid=dead_pid())
    stale = path.read_bytes()
    guard = path.with_name(f"{LOCK_NAME}.{hashlib.sha256(stale).hexdigest()[:16]}.takeover")
    guard.write_text("")
    old = time.time() - 60
    os.utime(guard, (old, old))
    with pytest.warns(RuntimeWarning, match="took over the lock"):
        lock = acquire(tmp_path, "new run")
    assert json.loads(path.read_text())["command"] == "new run" and not guard.exists()
    release(lock)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_racing_processes_leave_one_owner(tmp_path, stale):
    if stale:
        write_lock(tmp_path, pid=dead_pid())
    start = str(time.time() + 1.5)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), start],
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [r.communicate(timeout=60)[0] for r in racers]
    assert sorted(o.split()[0] for o in outs) == ["refused"] * 3 + ["won"], outs
    winner = racers[[o.split()[0] for o in outs].index("won")].pid
    assert all(f"pid {winner} on host" in o for o in outs if o.startswith("refused")), outs
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_pid_namespace_is_refused_and_one_from_before_a_restart_taken_over(
        tmp_path):
    """A container with the host's hostname but its own pids (host networking): its lock names
    a pid this process cannot see, so it is refused, not taken over from a live run. A lock
    written before the machine restarted is a dead owner's."""
    from fxtrain.apps._workdir import _machine
    here = _machine()
    if "pid_namespace" not in here or "boot" not in here:
        pytest.skip("no /proc pid namespace or boot id here")
    write_lock(tmp_path, pid=dead_pid(), pid_namespace="pid:[1]")
    with pytest.raises(WorkdirLocked, match="or another container's"):
        acquire(tmp_path, "new run")
    write_lock(tmp_path, pid=os.getppid(), boot="an-earlier-boot", **{
        "pid_namespace": here["pid_namespace"]})
    with pytest.warns(RuntimeWarning, match="the machine has restarted since"):
        release(acquire(tmp_path, "new run"))
