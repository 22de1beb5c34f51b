"""test_sharding's tests that run several ranks (the rest: tests/unit/test_sharding.py)."""

import re
import shutil

import pytest
import torch
import dist_worker
import fxtrain as fx
import fxtrain.checkpoint.store
import fxtrain.cli
from helpers import extra, mlp, once_per_run
from helpers_distributed import UNITS_COMPILED, results, spawn, stored_chunks


@pytest.fixture(scope="module")
def sharding_jobs(tmp_path_factory):
    """The 2-rank scenarios of the tests below (the short eager ones, and the sharded and
    per-block runs, eager and compiled: "global_eager", "units_compiled", ...), run by one
    2-rank launch, each writing into its own folder of the one returned
    (``dist_worker.several``); and the sharded run's one-process reference ("single")."""
    from fxtrain._torch.version import at_least
    precision = "16-mixed"  # autocast, and loss scaling whose finite check spans the shards
    jobs = {"sharded": ("sharded", {"precision": precision}),
            "replicated": ("sharded", {"precision": precision, "shard": False}),
            "callbacks": ("sharded_callbacks", {}),
            "global_eager": ("sharded", {"batch": 16}),
            "global_compiled": ("sharded", {"batch": 16, "compiled": True}),
            "units_eager": ("sharded_units", {})}
    if at_least(2, 13):  # the compiled units (UNITS_COMPILED: refused before, in their test)
        jobs["units_compiled"] = ("sharded_units", {"compiled": "inductor"})
    jobs["float8"] = ("float8_gather", {})

    def make(out):
        for folder in (*jobs, "single"):
            (out / folder).mkdir()
        spawn("several", [(name, (str(out / folder),), kwargs)
                          for folder, (name, kwargs) in jobs.items()])
        dist_worker.sharded(str(out / "single"), batch=32)  # this process: world size 1

    return once_per_run(tmp_path_factory, "sharding_jobs", make)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sharded_training_equals_one_process_with_the_global_batch(sharding_jobs, compiled):
    r0, r1 = results(sharding_jobs / ("global_compiled" if compiled else "global_eager"))
    assert r0["sharded"] and r0["digest"] == r1["digest"]  # the ranks agree bit for bit
    for r in (r0, r1):  # each rank holds about half the parameters and optimizer state
        assert 0.45 * r["whole"] <= sum(r["local"]) <= 0.6 * r["whole"], (r["local"], r["whole"])
    if compiled:
        assert r0["graphs"] == 1  # gather, reduce-scatter and optimizer in the one graph
    single = torch.load(sharding_jobs / "single" / "rank0.pt")  # this process: world size 1
    assert not single["sharded"]
    for k, p in single["params"].items():
        torch.testing.assert_close(r0["params"][k], p, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["module"][k], r0["params"][k])  # fx.trained_module: whole
    torch.testing.assert_close(r0["predicted"], single["predicted"], rtol=1e-4, atol=1e-5)
    # grad_norm (a norm over the shards, reduced over the ranks) is the whole gradient's
    torch.testing.assert_close(r0["grad_norms"], single["grad_norms"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharding_composes_with_mixed_precision_as_data_parallel_does(sharding_jobs):
    sharded, replicated = (results(sharding_jobs / name)[0] for name in ("sharded",
                                                                         "replicated"))
    assert sharded["sharded"] and not replicated["sharded"]
    for k, p in replicated["params"].items():
        torch.testing.assert_close(sharded["params"][k], p, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_callbacks_that_copy_the_parameters_are_sharded_with_them(sharding_jobs):
    r0, r1 = results(sharding_jobs / "callbacks")
    assert r0["after"] == r0["passed"] == r1["passed"] and r0["after"][1]  # swa: a DTensor
    assert any("state.callbacks['swa']" in w and "fx.shard(state, callbacks=[...])" in w
               for w in r0["not passed"])


@pytest.mark.slow
def test_float8_all_gather_moves_float8_bytes_and_trains_as_without(sharding_jobs):
    """torchao's enable_fsdp_float8_all_gather on fx.shard's eager units: the float8 layers'
    weights gathered as float8 bytes (a quarter of float32's), the same losses and parameters
    as the float8 run that gathers them in float32 (a tensorwise cast is element by element and
    takes the scale of the amax over the ranks: the whole weight's bits), and the layouts it
    does not cover yet refused by name."""
    r0, r1 = results(sharding_jobs / "float8")
    if r0.get("skipped"):
        extra("torchao")
    plain, float8 = r0["float32 gather"], r0["float8 gather"]
    weights = 2 * 2 * 32 * 48 * 4  # the blocks' float8 weights, float32 bytes
    assert float8["collectives"]["bytes"]["torch.uint8"] * 4 == weights  # the forward's gather
    assert "torch.uint8" not in plain["collectives"]["bytes"]
    assert plain["collectives"]["bytes"]["torch.float32"] >= 2 * weights  # forward, backward
    assert float8["losses"] == plain["losses"] == r1["float8 gather"]["losses"]
    for k, p in plain["params"].items():
        assert torch.equal(float8["params"][k], p), k
    assert "in per-block units only, and 'blocks.0.down.weight' is sharded whole" in r0["whole"]
    assert "not in an eager step inside an activation-checkpointed region" in r0["region"]


@pytest.mark.slow
def test_float8_all_gather_in_a_compiled_step(sharding_jobs):
    """enable_fsdp_float8_all_gather on fx.shard's units in a compiled step (the traced backend:
    the promise is the graph's): one graph, restore included; the float8 weights' all-gathers
    (the forward's, and the backward's recomputed one) move a quarter of float32's bytes; the
    losses and parameters are those of the compiled float8 run that gathers in float32, exactly
    (the same tensorwise cast: amax over the ranks, then element by element; the same
    products; the same reduce-scatters, in float32), and a restore after half the steps ends
    on the same state, bit for bit."""
    r0, r1 = results(sharding_jobs / "float8")
    if r0.get("skipped"):
        extra("torchao")
    plain, float8 = r0["compiled"]["float32 gather"], r0["compiled"]["float8 gather"]
    assert plain["graphs"] == float8["graphs"] == 1
    weights = 2 * 2 * 32 * 48 * 4  # the blocks' float8 weights, float32 bytes
    rest = plain["collectives"]["gathered"]["torch.float32"] - 2 * weights  # biases, root
    assert float8["collectives"]["gathered"] == {"torch.uint8": 2 * weights // 4,
                                                 "torch.float32": rest}
    assert float8["collectives"]["all_reduce"] == 4 + plain["collectives"]["all_reduce"]
    assert float8["collectives"]["reduce_scatter"] == {"torch.float32"}
    assert float8["losses"] == plain["losses"] == r1["compiled"]["float8 gather"]["losses"]
    for k, p in plain["params"].items():
        assert torch.equal(float8["params"][k], p), k
    assert float8["resumed"] == float8["digest"] == r1["compiled"]["float8 gather"]["resumed"]


@pytest.mark.slow
def test_sharded_checkpoints_restore_on_one_process_and_on_two_ranks(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    spawn("several", [("sharded_saves", (str(tmp_path), str(ckpt)), {}),  # saved, then
                      ("sharded_saves", (str(tmp_path), str(ckpt)), {"restore_only": "yes"})])
    r0, r1 = results(tmp_path)
    assert r0["digest"] == r1["digest"] and r0["steps"] == [8, 12]  # retention: the latest 2
    assert "FileExistsError" in r0["again"] and "already exists" in r1["again"]
    for path in (ckpt / "12", tmp_path / "final"):  # each rank wrote its own shards
        assert all((path / "shards" / f"__{r}_0.distcp").stat().st_size for r in (0, 1))
        assert stored_chunks(path, ".params['0.weight']") == [(9, 8), (8, 8)]

    make = lambda: fx.TrainState.create(mlp(sizes=(8, 17, 4)), fx.optim.adamw(1e-2))  # noqa
    like = make().replace(data=fx.data.Batches(dist_worker.X, 16, seed=1).init())
    alone = fx.checkpoint.CheckpointManager(ckpt).restore(like=like)  # one process, no group
    assert not fx.sharding.is_sharded(alone) and fx.tree_digest(alone) == r0["digest"]
    assert fx.tree_digest(fx.checkpoint.restore(tmp_path / "final", like=like)) == r0["digest"]
    assert fx.cli.main(["inspect", str(ckpt), "--step", "12", "--digest"]) == 0
    out = capsys.readouterr().out
    assert f"digest (step 12): {r0['digest']}" in out and "written by 2 ranks" in out

    restored = [torch.load(tmp_path / f"restored{r}.pt") for r in (0, 1)]  # on two ranks
    assert {r["latest"] for r in restored} == {r["final"] for r in restored} == {r0["digest"]}
    assert [r["local"] for r in restored] == [(9, 8), (8, 8)]  # 17 rows, resharded on load

    # each rank checksummed the file it wrote; a flipped bit in rank 1's is named, whoever reads
    table = fxtrain.checkpoint.store.read_meta(ckpt / "12")
    assert sorted(table["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    flipped = tmp_path / "flipped"  # a copy, so that one launch reads it and the intact one
    shutil.copytree(ckpt, flipped / "ckpt")
    shard = flipped / "ckpt" / "12" / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 4
    shard.write_bytes(bytes(data))
    named = r"its shard file shards/__1_0\.distcp differ.*CRC-32 mismatch"
    with pytest.raises(fx.checkpoint.DamagedCheckpointError, match=named):
        fx.checkpoint.CheckpointManager(flipped / "ckpt").restore(like=like, step=12)
    # on two ranks: the flipped bit; then, from the intact checkpoint, a read failing on one
    # rank only: both ranks raise it (none left waiting in a collective)
    eio = tmp_path / "eio"
    eio.mkdir()
    spawn("several", [
        ("sharded_saves", (str(flipped), str(flipped / "ckpt")), {"restore_only": "yes"}),
        ("sharded_saves", (str(eio), str(ckpt)), {"restore_only": "yes", "eio_rank": "1"})])
    for r in (0, 1):
        assert re.search(named, torch.load(flipped / f"restored{r}.pt")["damaged"])
    for r in (0, 1):
        said = torch.load(eio / f"restored{r}.pt")["damaged"]
        assert said.startswith("UnreadableCheckpointError") and "Input/output error" in said

    wider = fx.TrainState.create(mlp(sizes=(8, 18, 4, 3)), fx.optim.adamw(1e-2))
    with pytest.raises(fx.checkpoint.CheckpointMismatchError) as error:
        fx.checkpoint.restore(ckpt, like=wider.replace(data=like.data))
    assert "shape of .params['0.weight']: checkpoint (17, 8), template (18, 8)" in str(error.value)
    assert "missing from the checkpoint: .params['4.weight']" in str(error.value)


def test_a_sharded_run_leaves_no_gloo_thread_to_the_interpreters_exit(tmp_path):
    """DTensor's caches keep the mesh, and so the gloo group, past destroy_process_group; left
    to the interpreter's finalization, a gloo worker freeing its last work there aborted the
    process now and then (SIGABRT after a run that succeeded). fxtrain destroys the group at
    exit, before finalization: by the last exit handler no gloo thread is left."""
    spawn("sharded_exit", str(tmp_path))
    for rank in (0, 1):
        names = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert names and not [n for n in names if "gloo" in n], (rank, names)


def test_shard_without_a_process_group_says_how_to_start_one():
    state = fx.TrainState.create(mlp(), fx.optim.adamw(1e-2))
    with pytest.raises(RuntimeError, match="torchrun and call fx.distributed.init"):
        fx.shard(state)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, pytest.param("inductor", marks=UNITS_COMPILED)],
                         ids=["eager", "compiled"])
def test_units_gather_per_block_and_train_as_the_whole_model_sharded(sharding_jobs, tmp_path,
                                                                    compiled):
    """fx.shard(units="auto"): each block of the ModuleList gathers its own parameters, in its
    forward and again in its backward, and its gradients come back reduce-scattered; trained
    with dropout, it ends where the same state sharded as one unit ends, trained eagerly (2
    ranks: a sum of two terms, whatever the grouping, so eager is bitwise; compiled, within
    float32 rounding: keyed masks are the same compiled and eager)."""
    out = sharding_jobs / ("units_compiled" if compiled else "units_eager")
    if not out.is_dir():  # torch before 2.13: its own launch, which the compile refuses
        out = tmp_path
        spawn("sharded_units", str(tmp_path), compiled=compiled)
    r0, r1 = results(out)
    assert r0["names"] == ["blocks.0", "blocks.1", "blocks.2"] and r0["module"] == "Block"
    assert r0["digests"] == r1["digests"]  # the ranks agree bit for bit
    for k, p in r0["whole"].items():
        if compiled:
            torch.testing.assert_close(r0["units"][k], p, rtol=1e-5, atol=3e-6)
        else:
            assert torch.equal(r0["units"][k], p), k
    # gathered and computed in bfloat16, reduced in float32, against float32 (SGD: the
    # difference is lr * steps * the gradients' difference, bfloat16's 2**-8 relative error
    # over sums of up to 17 products of terms below 1, growing as a random walk: 0.1 * 6 *
    # sqrt(17) * 2**-8 = 0.01; the float32 run moves them 8 times that)
    drift = max((r0["mixed"][k] - p).abs().max() for k, p in r0["plain"].items())
    moved = max((r0["plain"][k] - p).abs().max() for k, p in r0["initial"].items())
    assert drift < 0.01 and moved > 0.05, (drift, moved)
    # without dropout, units on 2 ranks train as one process on the doubled batch (float32
    # sums of the two halves in another order, over 6 AdamW steps; eager)
    for k, p in dist_worker.one_process_blocks().items() if not compiled else ():
        torch.testing.assert_close(r0["undropped"][k], p, rtol=1e-5, atol=1e-5)
    if compiled:  # one per compiled run (units, bfloat16 units): no recompiles
        assert r0["graphs"] == 2
        # units keep their forward's element-wise work (fxtrain.distributed._strategies.Sharded.recomputes):
        # nothing marked for the recompute pass, in any graph the backend got (torch 2.15 hands
        # the second run's step to the backend twice: once with the float hyperparameter that
        # changed symbolic, a trace Dynamo then discards and restarts specialized)
        assert len(r0["marked"]) >= 2 and not any(r0["marked"]), r0["marked"]
    else:  # the root's 4 tensors in one gather; each block's 4 in one, twice (forward,
        # backward), and one reduce-scatter of them, as FSDP2 moves a unit
        dtypes = r0["collectives"].pop("dtypes")
        del r0["collectives"]["bytes"]  # read by the float8 gather's test
        assert r0["collectives"] == {"all_gather": 1 + 2 * 3, "reduce_scatter": 1 + 3,
                                     "unwaited": 0}  # every gather is waited for
        assert dtypes == {("all_gather", "torch.float32"), ("reduce_scatter", "torch.float32")}
        root = {("all_gather", "torch.float32"), ("reduce_scatter", "torch.float32")}
        assert r0["bf16"]["reduce float32"] == root | {("all_gather", "torch.bfloat16")}
        assert r0["bf16"]["reduce bfloat16"] == root | {("all_gather", "torch.bfloat16"),
                                                        ("reduce_scatter", "torch.bfloat16")}
        assert r0["by_class"] == r0["names"]  # units=[Block]: the same blocks
        from fxtrain._torch.version import at_least  # fx.shard's default: blocks, or whole
        assert r0["defaults"] == {"blocks": r0["names"] if at_least(2, 13) else [], "mlp": [],
                                  "whole": []}
        errors = r0["errors"]
        assert "has no repeated blocks to take units from" in errors["no blocks"]
        assert "'blocks.9' is not a submodule of Blocks" in errors["unknown"]
        assert "Did you mean 'blocks.2', 'blocks.1', 'blocks.0'" in errors["unknown"]
        assert "'blocks.0' is inside 'blocks'" in errors["nested"]
        assert "'blocks.0.up.weight' is shared by 'blocks.0', 'blocks.1'" in errors["tied"]
        assert "pass units=... too" in errors["dtype alone"]
        assert "1-D or 2-D DeviceMesh, got one of shape (1, 1, 2)" in errors["3-D mesh"]
        assert "a 2-D mesh needs dimension names" in errors["unnamed"]
        assert "lays the ranks out as [[1, 0]]" in errors["ranks out of order"]
        assert "a reduce_dtype other than it is not supported" in errors["2-D reduce dtype"]
        assert "on a 2-D mesh (FSDP x tensor parallel, HSDP)" in errors["2-D func"]
        assert ("splits 'blocks.0.up.weight' (shape (17, 8)) along dimension 0 over 2 ranks, "
                "which does not divide its 17") in errors["uneven plan"]
        assert "autodiff='autograd'" in errors["2-D func"]
        assert "the mesh spans 1 ranks, the job has 2" in errors["part of the ranks"]
        assert "autodiff='autograd'" in errors["func"] and "units='whole'" in errors["func"]
    whole = sum(p.numel() * 4 for p in r0["whole"].values())
    assert r0["local"] <= 0.6 * whole


def test_before_torch_2_13_compiled_units_are_refused_naming_the_feature(tmp_path):
    """Where the compiled units run (2.13 and later) the test above trains them; before, the
    first call names the feature, the first torch that has it and what to do instead."""
    from fxtrain.step import _autodiff as gradients
    from fxtrain._torch.version import at_least

    if at_least(2, 13):
        assert "Dynamo cannot take" in gradients.SHARDED_AUTOGRAD_INSTEAD  # refused only <2.13
        return
    spawn("sharded_units_refused", str(tmp_path))
    for r in results(tmp_path):
        assert r["error"].startswith(
            f"UnsupportedTorchError: {gradients.SHARDED_AUTOGRAD} needs torch 2.13 or later; "
            f"this process has torch {torch.__version__}. "
            f"{gradients.SHARDED_AUTOGRAD_INSTEAD}"), r["error"]  # (fxtrain's: without
        assert "from user code" not in r["error"]  # Dynamo's appended trace, issue 75)


@pytest.mark.slow
@UNITS_COMPILED
def test_a_sequential_of_blocks_is_sharded_per_block_at_most_0_7x_one_process(tmp_path):
    """Issue 61's model, smaller: an nn.Sequential of 12 Sequential(Linear, ReLU) blocks, AdamW,
    compiled. fx.shard's default finds the repeated blocks (and logs which), so each of 2 ranks
    peaks at most 0.7x one process's in tensors (the state it holds and what the step allocates
    above it); sharded whole, it peaked above one process (1.13x in the issue)."""
    spawn("sequential_blocks", str(tmp_path))
    ranks = results(tmp_path)
    (tmp_path / "one").mkdir()
    dist_worker.sequential_blocks(str(tmp_path / "one"))  # this process: world size 1
    one = torch.load(tmp_path / "one" / "rank0.pt")
    blocks = [str(i) for i in range(12)]
    assert [r["units"] for r in ranks] == [blocks, blocks] and one["units"] == []
    assert any("12 units, repeated blocks: Sequential in the model ('0', '1', '2', ...)" in line
               for line in ranks[0]["said"]), ranks[0]["said"]
    ratios = [r["peak_bytes"] / one["peak_bytes"] for r in ranks]
    # measured 0.531 on both ranks in 11 of 12, quiet and beside busy loops, 0.556 once (one
    # more unit's gather alive; ``allocated_peak``: gloo's own copies left out, which had moved
    # it to 0.753 once in CI); sharded whole (units="whole") 1.053x, 1.13x in issue 61
    assert max(ratios) <= 0.7, (ratios, [r["peak_bytes"] for r in ranks], one["peak_bytes"])
