"""Checkpoints in object storage, against a real S3-compatible server (moto's server mode, a
process of its own: tests/helpers_s3.py): a manager's whole life there (async saves, retention,
the best checkpoint, checksums, a damaged step and fit's fallback), a run killed during an async
save and resumed exactly, and the server going away in the middle of a save.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, DamagedCheckpointError
from helpers import extra
from helpers_checkpoint_damage import X, Y, batches, state, template
from helpers_s3 import BUCKET, SECRET, Relay, environment, make_bucket, objects, server
from helpers import xent

URL = f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def endpoint():
    extra("s3fs")
    extra("moto")
    with server() as url:
        make_bucket(url)
        yield url


@pytest.fixture
def s3(endpoint, monkeypatch):
    """The environment pointing at the server, as a user's would."""
    for k, v in environment(endpoint).items():
        monkeypatch.setenv(k, v)
    return endpoint


def run(directory, steps, **manager):
    """Trains to ``steps``, evaluated and saved every 5 steps in ``directory``."""
    every5 = [fx.callbacks.checkpoint_policy(every=5)]
    with CheckpointManager(directory, **manager) as m:
        return fx.fit(state(), fx.make_train_step(xent), batches(), callbacks=every5,
                      max_steps=steps, checkpoint=m, eval_step=fx.make_eval_step(xent),
                      eval_data=[(X[:48], Y[:48])], eval_every=5)


def test_a_manager_in_s3_saves_retains_ranks_and_restores_as_on_a_disk(s3, tmp_path, capsys):
    """Async saves every 5 steps with retention and a best checkpoint, in S3 and on a disk:
    the same steps kept, the same best, and restores bit-identical to the disk's."""
    kept = dict(keep_latest=2, keep_best=1, best_metric="loss", best_mode="max")
    end = run(f"{URL}/life", 20, **kept)
    local = run(tmp_path / "disk", 20, **kept)
    assert fx.tree_digest(end) == fx.tree_digest(local)
    with CheckpointManager(f"{URL}/life", **kept) as m, \
            CheckpointManager(tmp_path / "disk", **kept) as d:
        assert m.all_steps() == d.all_steps() and len(m.all_steps()) == 3
        assert m.best_step() == d.best_step() and m.best_step() not in m.all_steps()[-2:]
        for step in m.all_steps():
            assert fx.tree_digest(m.restore(template(), step)) == \
                fx.tree_digest(d.restore(template(), step))
        assert m.metrics(20) == d.metrics(20) and m.info()["step"] == 20
        assert m.verify(20)["step"] == 20
    assert fx.tree_digest(fx.checkpoint.restore(f"{URL}/life", template())) == \
        fx.tree_digest(end)
    from fxtrain.cli import main
    assert main(["inspect", f"{URL}/life", "--verify", "--digest"]) == 0
    shown = capsys.readouterr().out
    assert f"digest (step 20): {fx.tree_digest(end)}" in shown and shown.count("verified") == 3
    # only committed steps are there, each with its commit
    names = {key.split("/")[2] for key in objects("life")}
    assert names == {str(s) for s in m.all_steps()}
    assert all(f"{BUCKET}/life/{s}/fxtrain-commit.json" in objects("life")
               for s in m.all_steps())


def test_one_checkpoint_saved_to_s3_is_never_overwritten(s3):
    trained = run(f"{URL}/once-run", 5, async_save=False)
    path = fx.checkpoint.save(f"{URL}/once", trained, metadata={"note": "final"})
    assert str(path) == f"{URL}/once"
    assert fx.tree_digest(fx.checkpoint.restore(path, template())) == fx.tree_digest(trained)
    before = objects("once")
    with pytest.raises(FileExistsError, match="never overwrites"):
        fx.checkpoint.save(path, trained)
    assert objects("once") == before


def test_bad_locations_are_refused_by_name(s3):
    with pytest.raises(FileNotFoundError, match="the bucket no-such-bucket does not exist"):
        CheckpointManager("s3://no-such-bucket/run").save(state())
    with pytest.raises(ValueError, match="carries credentials"):
        CheckpointManager("s3://AKIA:secret@bucket/run")
    with pytest.raises(FileNotFoundError, match=f"no fxtrain checkpoints in {URL}/nothing"):
        fx.checkpoint.restore(f"{URL}/nothing", template())


def test_a_damaged_step_in_s3_is_named_and_fit_resumes_from_the_one_before(s3):
    """A flipped byte in an object of the latest step: restore names the step's URL and the
    file; fit sets the step aside (``<step>.damaged``) and resumes from the one before, to the
    uninterrupted run's digest."""
    import s3fs
    whole = run(f"{URL}/damage-whole", 15, async_save=False)
    run(f"{URL}/damage", 10, keep_latest=3, async_save=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    data = max((k for k in objects("damage/10") if "/state/" in k), key=fs.size)
    raw = bytearray(fs.cat_file(data))
    raw[len(raw) // 2] ^= 0x40
    fs.pipe_file(data, bytes(raw))
    with CheckpointManager(f"{URL}/damage") as m:
        with pytest.raises(DamagedCheckpointError, match=rf"{URL}/damage/10 is damaged: the "
                                                         r"bytes of its file state/.* differ"):
            m.restore(template(), 10)
    with pytest.warns(RuntimeWarning, match="damaged"):
        end = run(f"{URL}/damage", 15, keep_latest=3, async_save=False)
    assert fx.tree_digest(end) == fx.tree_digest(whole)
    assert any(k.startswith(f"{BUCKET}/damage/10.damaged/") for k in objects("damage"))


def test_the_server_gone_mid_save_is_one_clear_error_and_loses_nothing(endpoint, monkeypatch):
    """The server goes away after the first objects of step 10 went up: the save fails with
    one error naming the step and the store; step 5 is still the latest checkpoint, restores
    as saved, and no object of step 10 looks like a checkpoint. With the server back, the next
    save writes step 10 whole, after deleting what the cut-off one left."""
    relay = Relay(endpoint)
    for k, v in environment(relay.endpoint).items():
        monkeypatch.setenv(k, v)
    try:
        m = CheckpointManager(f"{URL}/gone", async_save=True)
        s = fx.fit(state(), fx.make_train_step(xent), batches(), max_steps=5, checkpoint=m)
        m.wait()
        five = fx.tree_digest(s)
        later = fx.fit(s, fx.make_train_step(xent), batches(), max_steps=10)
        relay.cut_after(3, f"/{BUCKET}/gone/10/")
        assert m.save(later)  # handed to the writer thread
        with pytest.raises(OSError, match=rf"writing the checkpoint of step 10 to {URL}/gone "
                                          r"failed \(the older checkpoints are intact") as e:
            m.wait()
        assert SECRET not in str(e.value)
        assert relay.cut.is_set()
        relay.restore()
        assert m.all_steps() == [5]
        assert fx.tree_digest(m.restore(template(), 5)) == five
        left = [k for k in objects("gone") if "/gone/10/" in k]
        assert left and not any(k.endswith("fxtrain-commit.json") for k in left)
        m.close()
        with CheckpointManager(f"{URL}/gone") as again:
            assert again.save(later)
            again.wait()
            assert again.all_steps() == [5, 10]
            assert fx.tree_digest(again.restore(template(), 10)) == fx.tree_digest(later)
    finally:
        relay.close()


TRAIN = r'''
import os, signal, sys, time
import torch
import fxtrain as fx
sys.path.insert(0, sys.argv[3])
from helpers_checkpoint_damage import batches, state
from helpers import xent

url, kill_at = sys.argv[1], int(sys.argv[2])


def killer(state, event):
    if event.step == kill_at and event.kind == "checkpoint":  # the async upload is in flight
        os.kill(os.getpid(), signal.SIGKILL)


with fx.checkpoint.CheckpointManager(url, keep_latest=2) as manager:
    end = fx.fit(state(), fx.make_train_step(xent), batches(), max_steps=20, checkpoint=manager,
                 callbacks=[fx.callbacks.checkpoint_policy(every=5), killer])
print("digest", fx.tree_digest(end), flush=True)
'''


@pytest.mark.slow
def test_a_run_killed_during_async_saves_to_s3_resumes_exactly(s3, tmp_path):
    """Killed with SIGKILL right after two async saves were handed to the writer (steps 5,
    then 15), each time resumed from what S3 holds: the uninterrupted run's digest."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    tests = str(__import__("pathlib").Path(__file__).resolve().parents[1])

    def train(url, kill_at=-1):
        return subprocess.run([sys.executable, str(script), url, str(kill_at), tests],
                              capture_output=True, text=True, timeout=300)

    whole = train(f"{URL}/kill-whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for kill_at in (5, 15):
        killed = train(f"{URL}/kill", kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train(f"{URL}/kill")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint" in resumed.stdout
    digest = [line for line in resumed.stdout.splitlines() if line.startswith("digest")]
    assert digest == [line for line in whole.stdout.splitlines() if line.startswith("digest")]


def test_fxtrain_train_with_a_workdir_in_s3_runs_refuses_and_resumes_as_a_local_one(
        s3, tmp_path, capsys):
    """``fxtrain train --workdir s3://...``: the checkpoints, config.yaml and the logs in the
    bucket, the step-12 checkpoint equal to a local run's; a second run refused; a resume with
    more steps appends to the logs it finds there."""
    from fxtrain.cli import main
    from helpers_apps import _project
    config = _project(tmp_path)
    url = f"{URL}/cli"
    assert main(["train", str(config), "--workdir", str(tmp_path / "local")]) == 0
    assert main(["train", str(config), "--workdir", url]) == 0
    assert "done at step 12" in capsys.readouterr().out
    names = {k.split("/", 2)[2].split("/")[0] for k in objects("cli")}
    assert names == {"checkpoints", "config.yaml", "metrics.jsonl", "tensorboard"}
    with CheckpointManager(f"{url}/checkpoints") as s, \
            CheckpointManager(tmp_path / "local" / "checkpoints") as d:
        assert s.all_steps() == d.all_steps() == [6, 12]
        assert s.info(12)["leaves"] == d.info(12)["leaves"]  # the same values, bit for bit
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    steps = [json.loads(line)["step"] for line in
             fs.cat_file(f"{BUCKET}/cli/metrics.jsonl").decode().splitlines()]
    assert max(steps) == 12
    assert main(["train", str(config), "--workdir", url]) == 2
    assert f"workdir: {url} already holds a run (checkpoints up to step 12)" in \
        capsys.readouterr().err
    assert main(["train", str(config), "--workdir", "s3://no-such-bucket/run"]) == 2
    assert "the bucket no-such-bucket does not exist" in capsys.readouterr().err
    assert main(["train", str(config), "--workdir", url, "--resume", "true", "--max_steps",
                 "18", "--allow_changes", "max_steps"]) == 0
    assert "done at step 18" in capsys.readouterr().out
    more = [json.loads(line)["step"] for line in
            fs.cat_file(f"{BUCKET}/cli/metrics.jsonl").decode().splitlines()]
    assert more[:len(steps)] == steps and max(more) == 18
    assert any(k.endswith("config.12.yaml") for k in objects("cli"))  # the replaced config
    assert not any(k.endswith(".fxtrain.lock") for k in objects("cli"))
    # the credentials came from the environment and were written nowhere
    written = b"".join(fs.cat_file(k) for k in objects("cli") if "/checkpoints/" not in k)
    shown = capsys.readouterr()
    assert SECRET not in shown.out + shown.err and SECRET.encode() not in written
    assert "AKIAFXTRAINTESTKEY" not in shown.out + shown.err


def test_fxtrain_train_killed_in_s3_leaves_its_lock_which_the_resume_takes_over(
        s3, tmp_path, capsys):
    """A run into an S3 workdir killed after its step-6 checkpoint: its lock object stays;
    a second run while it lives is refused naming it; after the kill, the resume takes the
    lock over and goes on from step 6."""
    from fxtrain.cli import main
    from helpers_apps import _project
    config = _project(tmp_path)
    url, gate = f"{URL}/killed", tmp_path / "gate"
    args = ["train", str(config), "--workdir", url, "--data", "./models.py:gated",
            "--data_args", f"{{gate: {gate}, after: 9}}"]
    first = subprocess.Popen([sys.executable, "-m", "fxtrain", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "gate.waiting").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        assert main(args) == 2
        assert f"the workdir {url} is in use by " in capsys.readouterr().err
        first.kill()
        first.communicate()
    finally:
        first.kill()
        first.wait()
    assert any(k.endswith(".fxtrain.lock") for k in objects("killed"))
    gate.touch()
    with pytest.warns(RuntimeWarning, match=f"took over the lock {url}/.fxtrain.lock"):
        assert main([*args, "--resume", "true"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from the checkpoint of step 6 in {url}/checkpoints" in out
    assert "done at step 12" in out
    assert CheckpointManager(f"{url}/checkpoints").all_steps() == [6, 12]
