"""One owner per workdir (``fxtrain.apps._workdir``): the lock file names its owner, a live owner or
one on another host is refused, a dead owner's lock is taken over with a warning, and the lock
goes when the run ends, by an exception too. Several processes racing for one lock (a fresh
one, or a stale one) leave exactly one owner."""

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


def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(workdir: Path, **owner) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getppid(), "host": socket.gethostname(),
             "started": "2999-01-01T00:00:00+00:00", "command": "fxtrain train old.yaml", **owner}
    (workdir / LOCK_NAME).write_text(json.dumps(owner))
    return workdir / LOCK_NAME


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


RACER = textwrap.dedent("""
    import sys, time, warnings
    from fxtrain.apps._workdir import WorkdirLocked, acquire, release
    warnings.simplefilter("ignore")
    while time.time() < float(sys.argv[2]):  # start together
        pass
    try:
        lock = acquire(sys.argv[1], "racer")
    except WorkdirLocked as e:
        print("refused", e)
    else:
        print("won")
        time.sleep(1.0)
        release(lock)
    """)


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


def _ranks(rank: int, port: int, workdir: str) -> None:
    """Each of two gloo ranks: held() takes the lock on rank 0 only; a held workdir is refused
    on every rank."""
    import torch

    from fxtrain import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    distributed.init()
    try:
        with held(Path(workdir) / "free") as lock:
            owner = json.loads(lock.path.read_text())
            distributed.barrier()
        distributed.barrier()  # rank 0 has released it
        result = {"owner": owner["pid"], "me": os.getpid(), "released": not lock.path.exists()}
        if rank == 0:
            write_lock(Path(workdir) / "busy")  # by our parent, the test: alive
        distributed.barrier()
        try:
            with held(Path(workdir) / "busy"):
                result["refused"] = None
        except Exception as e:
            result["refused"] = f"{type(e).__name__}: {e}"
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_under_torch_distributed_rank_0_takes_the_lock_and_every_rank_refuses(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks, args=(port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["owner"] == one["owner"] == zero["me"] != one["me"]
    assert zero["released"] and one["released"]
    assert zero["refused"].startswith(f"WorkdirLocked: the workdir {tmp_path / 'busy'} is in use")
    assert one["refused"].startswith("RuntimeError: rank 0 could not lock the workdir")
    assert f"pid {os.getpid()} on host" in one["refused"]


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
