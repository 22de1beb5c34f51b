"""test_distributed's tests that run several ranks (the rest: tests/unit/test_distributed.py)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import fxtrain as fx
from helpers import extra, mlp, once_per_run, reaped
import dist_worker
from helpers_distributed import HERE, free_port, rank_of, results, spawn, torchrun


@pytest.fixture(scope="module")
def distributed_jobs(tmp_path_factory):
    """The short scenarios of the tests below (data parallel's eager and compiled runs
    among them: "dp_eager", "dp_compiled", their one-process reference "dp_single", and the
    autograd path's "overlapped"), run by one 2-rank launch, each writing into its own
    folder of the one returned (``dist_worker.several``)."""
    def make(out):
        jobs = [("train", "mean", {"model": "bn", "steps": 4}),
                ("train", "local", {"model": "bn", "steps": 4, "buffers": "local"}),
                ("early_stop", "early_stop", {}), ("host_stop", "host_stop", {}),
                ("timed_saves", "timed_saves", {}),
                ("train", "dp_eager", {"batch": 16}),
                ("train", "dp_compiled", {"batch": 16, "compiled": True}),
                ("overlapped", "overlapped", {})]
        for _, folder, _ in jobs:
            (out / folder).mkdir()
        spawn("several", [(name, (str(out / folder),) + ((str(out / folder / "ckpt"),)
                                                         if name == "timed_saves" else ()), kw)
                          for name, folder, kw in jobs])
        (out / "dp_single").mkdir()
        dist_worker.train(str(out / "dp_single"), batch=32)  # this process: world size 1

    return once_per_run(tmp_path_factory, "distributed_jobs", make)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_data_parallel_equals_one_process_with_the_global_batch(distributed_jobs, compiled):
    r0, r1 = results(distributed_jobs / ("dp_compiled" if compiled else "dp_eager"))
    assert r0["digest"] == r1["digest"]  # the ranks hold bit-identical states
    if compiled:
        assert r0["graphs"] == 1  # the all-reduce is inside the one graph
    single = torch.load(distributed_jobs / "dp_single" / "rank0.pt")  # world size 1
    for k, p in single["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_data_parallel_on_the_autograd_path_sums_each_gradient_inside_the_backward(
        tmp_path, distributed_jobs):
    """autodiff="autograd": each parameter's gradient is all-reduced as soon as the backward
    has produced it, the rest of the backward running meanwhile: the first all-reduce comes
    before the backward's last matrix product (the first layer's). The ranks agree bit for bit,
    eager and compiled (one graph); with dropout, compiled and eager draw the same masks; without,
    they train as one process on the global batch does."""
    r0, r1 = results(distributed_jobs / "overlapped")
    assert r0["digests"] == r1["digests"]
    assert r0["graphs"] == 1
    ops = r0["ops"]
    reduces = [i for i, op in enumerate(ops) if op == "all_reduce"]
    products = [i for i, op in enumerate(ops) if op in ("mm", "addmm")]
    assert len(reduces) >= 6 and reduces[0] < products[-1], (reduces, products)
    (tmp_path / "single").mkdir()
    dist_worker.train(str(tmp_path / "single"), batch=32, model="mlp3")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for k, p in single["params"].items():  # float32 sums of two halves in another order
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-5, atol=1e-6)
    for k, p in r0["eager"].items():  # the same masks; the traced graph's decomposed ops
        # round apart in float32
        torch.testing.assert_close(r0["compiled"][k], p, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batchnorm_buffers_are_averaged_or_kept_local(distributed_jobs):
    mean, local = results(distributed_jobs / "mean"), results(distributed_jobs / "local")
    assert mean[0]["digest"] == mean[1]["digest"]
    key = "1.running_mean"
    assert not torch.equal(local[0]["buffers"][key], local[1]["buffers"][key])
    torch.testing.assert_close(mean[0]["buffers"][key],
                               (local[0]["buffers"][key] + local[1]["buffers"][key]) / 2)


@pytest.mark.slow
def test_early_stopping_on_rank_merged_metrics_stops_every_rank_at_once(distributed_jobs):
    r0, r1 = results(distributed_jobs / "early_stop")
    assert r0["step"] == r1["step"] == 10
    assert [(s, m) for s, m, _ in r0["evals"]] == [(s, m) for s, m, _ in r1["evals"]]
    assert [s for s, _, _ in r0["evals"]] == [5, 10]
    # each rank evaluated its own share (70 and 30 of 100 examples): the merged loss is the
    # loss over all 100, so the ranks' losses weigh 0.7 and 0.3, not half each
    for (_, merged, local0), (_, _, local1) in zip(r0["evals"], r1["evals"]):
        assert merged == pytest.approx(0.7 * local0 + 0.3 * local1, rel=1e-5)
        assert abs(merged - (local0 + local1) / 2) > 1e-3


@pytest.mark.slow
def test_one_ranks_stop_request_stops_all_ranks_at_the_same_step(distributed_jobs):
    # asked at 7, read at 8
    assert [r["step"] for r in results(distributed_jobs / "host_stop")] == [8, 8]


@pytest.mark.slow
def test_timed_checkpoints_happen_at_the_same_steps_on_every_rank(distributed_jobs):
    # rank 1's clock runs out at step 2, rank 0's at 3: both save at the agreed read of step 4
    # (sync_every=4) and restart their clocks there; then 6 and 7, read at 8; 10 is the end
    assert [r["saved"] for r in results(distributed_jobs / "timed_saves")] == [[4, 8, 10],
                                                                                [4, 8, 10]]


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_with_its_error(tmp_path):
    with reaped(torchrun("failing", str(tmp_path))) as job:
        out, _ = job.communicate(timeout=300)  # rank 0 fails too (its peer is gone): no hang
    assert job.returncode != 0
    assert "RuntimeError: rank 1 exploded at step 3" in out  # the rank's own traceback


@pytest.mark.slow
def test_the_group_init_joined_is_left_at_exit(tmp_path):
    """A program that never calls destroy_process_group still leaves the group before the
    interpreter tears down (gloo's threads outliving it can abort a finished run)."""
    with reaped(torchrun("exits", str(tmp_path))) as job:
        out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out[-3000:]
    assert out.count("after fxtrain's exit handler: group left = True") == 2, out[-3000:]


@pytest.fixture(scope="module")
def resume_refs(tmp_path_factory):
    """The uninterrupted runs of the kill/resume test below, each in its own folder ("no",
    "units", "fsdp_tp"): the 2-rank ones in one launch (``dist_worker.several``), the 4-rank
    one in another, through torch.multiprocessing (no torchrun agent: the chains' runs, which
    are killed and resumed, keep torchrun). Once per run."""
    def make(out):
        for shard in ("no", "units", "fsdp_tp"):
            (out / shard).mkdir()
        job = lambda shard: ("resumable", (str(out / shard), str(out / shard / "ckpt")),  # noqa
                             {"shard": shard})
        spawn("several", [job("no"), job("units")])
        mp.spawn(dist_worker.spawned, nprocs=4, args=(4, free_port(), *job("fsdp_tp")))

    return once_per_run(tmp_path_factory, "resume_refs", make)


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["no", "units", "fsdp_tp"],
                         ids=["replicated", "sharded", "2-D mesh, 4 ranks"])
def test_two_process_run_killed_or_terminated_then_resumed_matches_the_uninterrupted_run(
        tmp_path, shard, resume_refs):
    """SIGKILL of one rank ends the job within seconds; SIGTERM of one rank saves on both; after
    each, torchrun resumes, and the run ends with the uninterrupted run's digest. One chain: the
    run killed after its checkpoint 10 is resumed, terminated after its next checkpoint, and
    resumed to the end (the sleeps slow the steps, not the CPU: the kill lands by step 20 and
    the SIGTERM at least 15 steps, 3 s, before the end, even on a loaded machine; with 0.1 s
    and 30 steps a SIGTERM read only at the last step failed 1 run in 10 under a CPU hog).
    Sharded: the state is fx.shard's, per layer (units), the model recomputed in the backward
    (fx.remat), and each rank writes its own shards of every checkpoint. 2-D mesh: 4 ranks on
    a 2 x 2 mesh, sharded over its first dimension, the hidden layer split by a
    tensor-parallel plan over its second."""
    ckpt = tmp_path / "b" / "ckpt"  # the chain's checkpoints
    nproc = 4 if shard == "fsdp_tp" else 2

    def torchrun_(*args):
        return torchrun(*args, nproc=nproc)

    def job(*args):
        return torchrun_("resumable", str(tmp_path / "b"), str(ckpt), *args, f"shard={shard}")

    def after_checkpoint(run, step):
        deadline = time.monotonic() + 200
        while not (ckpt / str(step)).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (ckpt / str(step)).exists(), "no checkpoint in time"
        return rank_of(run, 1)

    whole = resume_refs / shard  # the uninterrupted run
    whole_ckpt = whole / "ckpt"
    digests = {(whole / f"digest{r}.txt").read_text() for r in range(nproc)}
    assert len(digests) == 1
    steps = [e["step"] for e in fx.logging.read_jsonl(whole / "log.jsonl")]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # logs written once: by rank 0 only
    assert fx.checkpoint.CheckpointManager(whole_ckpt).all_steps() == [30, 35, 40]

    with reaped(job("sleep=0.2")) as run:
        after_checkpoint(run, 10).send_signal(signal.SIGKILL)  # one rank dies: no hang
        killed = time.monotonic()
        run.communicate(timeout=120)
    # well inside fx.distributed's 5-minute collective timeout, which a hang would wait out; 4
    # ranks on CI's 2 cores under load ended 30.7 s after the kill once (a fresh-clone .ci/run)
    assert run.returncode != 0 and time.monotonic() - killed < 60
    killed_at = fx.checkpoint.CheckpointManager(ckpt).latest_step()
    assert 10 <= killed_at <= 20

    # resumed, then SIGTERM to rank 1 alone: the ranks agree at the next flag read, both save
    # and exit 143
    with reaped(job("sleep=0.2")) as run:
        after_checkpoint(run, killed_at + 5).send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=120)
    assert f"resuming from the checkpoint of step {killed_at}" in out, out[-3000:]
    assert "exitcode  : 143" in out, out[-3000:]  # rank 1's own exit, after both saved
    assert not (tmp_path / "b" / "digest0.txt").exists()  # neither rank finished the run
    stopped = fx.checkpoint.CheckpointManager(ckpt).latest_step()
    assert killed_at + 5 <= stopped < 40

    with reaped(job()) as resumed:
        out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming from the checkpoint of step {stopped}" in out
    assert {(tmp_path / "b" / f"digest{r}.txt").read_text() for r in range(nproc)} == digests


@pytest.mark.slow
def test_two_nodes_meet_through_the_c10d_rendezvous_and_train_as_one_job(tmp_path):
    """Two torchrun agents of one process each, as two machines would run them: they find each
    other through the c10d rendezvous store and train like torchrun's two local processes."""
    port = free_port()
    cmd = lambda node: [  # noqa: E731
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
        "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}",
        "--rdzv_id=fxtrain-test", str(HERE / "dist_worker.py"), "train", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(reaped(subprocess.Popen(
            cmd(node), env=env, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))) for node in (0, 1)]
        outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    r0, r1 = results(tmp_path)
    assert r0["digest"] == r1["digest"]  # one job: gradients averaged across the two nodes
    single = tmp_path / "single"
    single.mkdir()
    dist_worker.train(str(single), batch=32)  # one process with the global batch
    expected = torch.load(single / "rank0.pt")
    for k, p in expected["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-5, atol=1e-6)
