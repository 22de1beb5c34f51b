"""test_tensor_parallel's tests that run several ranks (the rest: tests/unit/test_tensor_parallel.py)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain as fx
from helpers import extra, once_per_run
from helpers_distributed import free_port
from helpers_tensor_parallel import spawn


@pytest.fixture(scope="module")
def tp_jobs(tmp_path_factory):
    """The 2-rank runs of the tests below in one launch (``dist_worker.several``), each
    writing into its own folder of the one returned: the plan's run eager ("eager") and
    compiled ("compiled", where torch compiles it: 2.13 and later), each saving its checkpoint
    ("ckpt"), and the layout made after the data and step or before them ("firstTrue",
    "firstFalse"); then their references in this process, alone: no plan ("one", "alone").
    Once per run."""
    from fxtrain._torch.version import at_least

    def make(out):
        jobs = [("tensor_parallel", (str(out / kind),), {"ckpt": str(out / kind / "ckpt"),
                                                          "compiled": kind == "compiled"})
                for kind in ("eager", "compiled") if kind == "eager" or at_least(2, 13)]
        jobs += [("layout_first_or_last", (str(out / f"first{first}"),), {"first": first})
                 for first in (True, False)]
        for _, (folder,), _ in jobs:
            os.mkdir(folder)
        mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), "several", (jobs,), {}))
        for folder in ("one", "alone"):
            (out / folder).mkdir()
        dist_worker.tensor_parallel(str(out / "one"))
        dist_worker.layout_first_or_last(str(out / "alone"))

    return once_per_run(tmp_path_factory, "tp_jobs", make)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.needs_torch(
    2, 13, "a compiled autograd step on DTensor parameters"))], ids=["eager", "compiled"])
def test_a_plan_over_two_ranks_trains_as_one_process_and_restores_onto_one(tp_jobs, tmp_path,
                                                                         compiled):
    """20 AdamW steps: the losses and parameters of TP=2 against one process within float32
    rounding (each row-split matrix product two partial sums all-reduced: other additions of
    the same terms); the ranks agree bit for bit; each holds at most 0.6x the parameters and
    optimizer state (the layers split, the embeddings, head and norms whole: 0.54x); compiled,
    one graph. It evaluates as one process does (found dying at its first evaluation: the
    plan's hooks given whole parameters), in fit and after it, eager and compiled, predicts,
    and gives back its trained module."""
    out = tp_jobs / ("compiled" if compiled else "eager")
    if not out.is_dir():  # torch before 2.13: its own launch, which the compile refuses
        out = tmp_path
        spawn(tmp_path, ckpt=str(tmp_path / "ckpt"), compiled=compiled)
    ranks = [torch.load(out / f"tp_rank{r}.pt") for r in (0, 1)]
    alone = torch.load(tp_jobs / "one" / "tp_rank0.pt")  # this process, alone: no plan
    # q, k, v, o, gate, up, down in each of rank_llama's layers
    assert len(ranks[0]["split"]) == dist_worker.RANK_LAYERS * 7
    assert ranks[0]["losses"] == ranks[1]["losses"]
    dist_worker.check_evaluated(ranks, alone)  # in fit, evaluate, predict, the module
    tp, whole = torch.tensor(ranks[0]["losses"]), torch.tensor(alone["losses"])
    # the first steps: a few float32 ulps of a loss near 3 (2.4e-7 each); then AdamW, which
    # moves a parameter by about lr whatever its gradient's size, lets the ulps of near-zero
    # gradients grow step by step (seen: 7e-5 by step 18), so the run is held to 1e-4 of it
    torch.testing.assert_close(tp[:5], whole[:5], rtol=0, atol=1e-6)
    torch.testing.assert_close(tp, whole, rtol=1e-4, atol=0)
    for name, p in alone["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], p, rtol=0, atol=5e-4)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
    assert alone["losses"][-1] < alone["losses"][0] - 0.1  # it trained: not a vacuous match
    ratio = ranks[0]["held"] / alone["held"]
    assert ratio <= 0.6, ratio
    if compiled:
        assert ranks[0]["graphs"] == 1
    like = fx.TrainState.create(dist_worker.rank_llama(seed=1), fx.optim.adamw(1e-2))
    restored = fx.checkpoint.restore(out / "ckpt", like=like.replace(
        data=dist_worker.llama_batches().init()))
    for name, p in ranks[0]["params"].items():
        assert torch.equal(restored.params[name], p), name


@pytest.mark.slow
def test_shard_after_the_data_and_the_step_and_evaluation_on_a_plan(tp_jobs):
    """The layout is the state's: fx.shard after fx.data.Batches(...) and make_train_step(...)
    trains what fx.shard before them does (the data's share and the step's path are resolved
    from the state when fit starts: the same bits on the same machine). A tensor-parallel
    state evaluates in fit, with fx.evaluate and fx.predict, and gives back its trained module
    (found dying at its first evaluation: a plan's hooks given whole parameters); its
    evaluations are one process's within float32 rounding."""
    runs = {first: [torch.load(tp_jobs / f"first{first}" / f"rank{r}.pt") for r in (0, 1)]
            for first in (True, False)}
    one = torch.load(tp_jobs / "alone" / "rank0.pt")
    for r in (0, 1):
        before, after = runs[True][r], runs[False][r]
        assert before["losses"] == after["losses"] and before["evals"] == after["evals"]
        for k, p in before["params"].items():
            assert torch.equal(p, after["params"][k]), k
    ranks = runs[True]
    assert len(ranks[0]["evals"]) == 2 and ranks[0]["evals"] == ranks[1]["evals"]
    # 6 AdamW steps of a row-split product (partial sums all-reduced: other additions of the
    # same terms) leave the parameters within 5e-4 of one process's (as the 20-step test
    # above); the evaluated loss of logits that close, within 1e-3 of a loss near 3
    for got, want in zip(ranks[0]["evals"], one["evals"]):
        assert got.keys() == want.keys()
        for k in want:
            assert abs(got[k] - want[k]) <= 1e-3, (k, got, want)
    assert abs(ranks[0]["evaluated"]["loss"] - one["evaluated"]["loss"]) <= 1e-3
    torch.testing.assert_close(ranks[0]["predicted"], one["predicted"], rtol=0, atol=5e-3)
    torch.testing.assert_close(ranks[0]["logits"], ranks[0]["predicted"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
