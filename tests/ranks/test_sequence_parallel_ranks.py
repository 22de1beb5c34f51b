"""Sequence and loss parallelism (``fx.shard(state, tp_plan=...)`` with ``SequenceParallel``,
``PrepareModuleInput`` and a head whose logits stay split along the vocabulary, the loss
``fx.losses.causal_lm``'s loss parallel): a tiny Llama under torchtitan's plan trains as torch's
own ``parallelize_module`` with ``loss_parallel`` does and as one process does, on 2 gloo ranks
(eager and compiled into one graph) and on a 2 x 2 mesh (FSDP x TP, compiled); keyed dropout
on activations split along the sequence drops what one process drops."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import sp_worker
from helpers import extra, once_per_run
from helpers_distributed import free_port

transformers = extra("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.needs_torch(
    2, 13, "a compiled autograd step on DTensor parameters")]


def spawn(world, fn, *args, **kwargs):
    mp.spawn(dist_worker.spawned, nprocs=world, args=(world, free_port(), fn, args, kwargs))


@pytest.fixture(scope="module")
def sp_jobs(tmp_path_factory):
    """The 2-rank scenarios of the tests below (the plan's run, keyed dropout on the split) in
    one launch (``dist_worker.several``), each writing into its own folder of the one returned,
    and their references alone in this process (no mesh, no plan: "alone/"), once per run."""
    def make(out):
        jobs = {"tp": sp_worker.sequence_parallel, "dropout": sp_worker.sequence_dropout}
        for folder in (*jobs, "alone"):
            (out / folder).mkdir()
        spawn(2, "several", [(fn, (str(out / folder),), {}) for folder, fn in jobs.items()])
        for fn in jobs.values():
            fn(str(out / "alone"))

    return once_per_run(tmp_path_factory, "sp_jobs", make)


def alone(sp_jobs, name):
    """A scenario's run in this process, alone: no mesh, no plan."""
    return torch.load(sp_jobs / "alone" / name)


def close(run, reference, atol):
    """Losses and parameters of ``run`` within float32 rounding of ``reference``'s: a few ulps
    of a loss near 3 over the first steps (each split product's partial sums added in another
    order), and AdamW's steps, which move a parameter by about lr whatever its gradient's size,
    letting the ulps of near-zero gradients grow (the tensor-parallel tests' bounds)."""
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]),
                               rtol=0, atol=atol)
    for name, p in reference["params"].items():
        torch.testing.assert_close(run["params"][name], p, rtol=0, atol=5e-4, msg=name)


def test_sequence_and_loss_parallel_train_as_torch_and_one_process(sp_jobs):
    """4 AdamW steps of a tiny Llama under torchtitan's sequence- and loss-parallel plan on 2
    ranks: eager and compiled (one graph), against torch's parallelize_module + loss_parallel +
    torch.optim.AdamW with the same plan and against one process, within float32 rounding; the
    ranks agree bit for bit; eager and compiled alike."""
    ranks = [torch.load(sp_jobs / "tp" / f"tp_rank{r}.pt") for r in (0, 1)]
    one = alone(sp_jobs, "tp_rank0.pt")["eager"]
    assert one["losses"][-1] < one["losses"][0] - 0.1  # it trained: not a vacuous match
    for kind in ("eager", "compiled"):
        run = ranks[0][kind]
        assert run["losses"] == ranks[1][kind]["losses"]
        for name, p in run["params"].items():
            assert torch.equal(p, ranks[1][kind]["params"][name]), name
        close(run, ranks[0]["torch"], atol=1e-5)
        close(run, one, atol=1e-5)
    assert ranks[0]["compiled"]["graphs"] == 1  # restored and continued without a recompile
    close(ranks[0]["compiled"], ranks[0]["eager"], atol=1e-6)
    for kind in ("eager", "compiled"):
        beyond_the_step(ranks, kind, one)


def beyond_the_step(ranks, kind, one):
    """Issue 61: the plan past the train step. Resumed from the checkpoint saved halfway into a
    fresh sharded state (``restore(like=...)``) and trained on by ``fx.fit``, the run ends bit
    for bit where the uninterrupted one did, its losses the same; fit's evaluation at the end
    (the run's first: "a tensor-parallel run dies at its first evaluation"), ``fx.evaluate``
    (compiled for the compiled run), ``fx.predict`` and the trained module agree between the
    ranks, with each other and with one process within float32 rounding."""
    run = ranks[0][kind]
    assert run["resumed_digest"] == run["digest"] == ranks[1][kind]["resumed_digest"]
    assert run["resumed_losses"] == run["losses"][sp_worker.STEPS // 2:]
    for key in ("resumed_evals", "evaluated"):
        assert run[key] == ranks[1][kind][key], key
    for key in ("predicted", "logits"):
        assert torch.equal(run[key], ranks[1][kind][key]), key
    (at_end,) = run["resumed_evals"]
    assert abs(at_end["loss"] - run["evaluated"]) < 1e-6
    assert abs(run["evaluated"] - one["evaluated"]) < 1e-5
    torch.testing.assert_close(run["predicted"], run["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(run["predicted"], one["predicted"], rtol=0, atol=1e-4)


def test_sequence_and_loss_parallel_on_a_2d_mesh_train_as_one_process(tmp_path, sp_jobs,
                                                                     mesh_jobs):
    """The same plan over the "tp" dimension of a 2 x 2 mesh, sharded over "dp" (4 ranks, two
    data replicas of 2 sequences each), compiled into one graph: one process's losses and
    parameters within float32 rounding (averaged gradients: other additions of the same
    terms); the ranks agree bit for bit. Run in test_meshes.py's 4-rank launch."""
    out = mesh_jobs / "sp"
    if not out.is_dir():  # torch before 2.13: its own launch, which the compile refuses
        out = tmp_path
        spawn(4, sp_worker.sequence_parallel, str(tmp_path), layout="fsdp_tp")
    ranks = [torch.load(out / f"fsdp_tp_rank{r}.pt")["compiled"] for r in range(4)]
    one = alone(sp_jobs, "tp_rank0.pt")["eager"]
    assert [r["graphs"] for r in ranks] == [1] * 4
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    close(ranks[0], one, atol=1e-5)


def test_keyed_dropout_on_the_sequence_split_drops_what_one_process_drops(sp_jobs):
    """A keyed F.dropout of a Shard(1) DTensor gives each rank exactly its slice of one
    process's mask; a model whose dropouts run on the sequence's split (SequenceParallel on
    nn.Dropout, p=0.5) trains as one process does, eager and compiled (one graph), within
    float32 rounding. Before, a keyed dropout of a DTensor failed (a whole-shaped mask met the
    DTensor: "mixed torch.Tensor and DTensor")."""
    ranks = [torch.load(sp_jobs / "dropout" / f"dropout_rank{r}.pt") for r in (0, 1)]
    one = alone(sp_jobs, "dropout_rank0.pt")
    for r, run in enumerate(ranks):
        assert torch.equal(run["part"], one["whole"][:, 6 * r:6 * (r + 1)])
    for kind in ("eager", "compiled"):
        assert ranks[0][kind]["losses"] == ranks[1][kind]["losses"]
        close(ranks[0][kind], one["eager"], atol=1e-5)
    assert ranks[0]["compiled"]["graphs"] == 1


def test_what_a_sequence_parallel_job_cannot_take_is_refused_on_every_rank(tmp_path):
    """Issue 75, hole 5: a sequence the ranks do not divide (a shape error on one rank, an abort
    on the other), SequenceParallel where nothing splits the sequence (GPT-2's ln_1; a plan of
    norms alone) and on a tensor without a sequence dimension: each one ValueError naming the
    problem and the fix, the same on both ranks, eager and compiled."""
    spawn(2, sp_worker.refused, str(tmp_path))
    ranks = [torch.load(tmp_path / f"refused_rank{r}.pt") for r in (0, 1)]
    assert ranks[0] == ranks[1]
    found = ranks[0]
    for kind in ("eager", "compiled"):
        assert "splits its input of shape (2, 11, 32) along dimension 1 over 2 ranks, which " \
               "does not divide its 11" in found[f"odd_sequence_{kind}"], found
        assert "'model.layers.0'" in found[f"odd_sequence_{kind}"]
    for case in ("gpt2_ln_1", "llama_norms_alone"):
        assert "on the sequence's split (SequenceParallel), but nothing in it splits the " \
               "sequence" in found[case], found[case]
    assert "SequenceParallel on '1' splits its input along dimension 1 (a sequence), but it " \
           "gets a tensor of shape (2, 16)" in found["norm_without_a_sequence"], found
