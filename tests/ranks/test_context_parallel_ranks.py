"""Context parallelism (issue 79) on gloo ranks: ring attention over the ranks' head and tail
chunks equals causal SDPA over the whole sequence, and a Llama and a GPT-2 from transformers
configs, sharded with fx.shard(context="cp"), train as one process does on the whole sequences:
eager and compiled (one graph), with dropout, on 2 ranks and on 2 x 2 x 2 (FSDP x CP x TP).
The slices and meshes alone: tests/unit/test_context_slots.py."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain as fx
from helpers import extra
from helpers_distributed import free_port

transformers = extra("transformers")
import cp_worker  # noqa: E402  (after the extras' check)

pytestmark = pytest.mark.needs_torch(2, 13, "context parallelism's ring attention")

# Float32 rounding: the ring merges each block's attention by its log-sum-exp, where SDPA takes
# one softmax over the row; outputs and gradients of order 1 then differ by a few ulps (seen:
# 1.1e-6). Bounded at 1e-5.
RING = 1e-5
# One process takes each step's whole sequences, the ranks their chunks: the same sums in
# another order, a few ulps of losses of order 3 (seen: 7e-7), bounded at 1e-5. AdamW
# normalizes each gradient, so where a gradient is tiny a rounding difference moves its
# parameter by up to the step's lr (1e-2); seen: 2.9e-5 after 10 steps, bounded at 1e-4.
LOSS, PARAMS = 1e-5, 1e-4


def _spawn(world, fn, *args, **kwargs):
    mp.spawn(dist_worker.spawned, nprocs=world, args=(world, free_port(), fn, args, kwargs))


def test_ring_attention_equals_causal_sdpa_over_the_whole_sequence(tmp_path):
    """On 2 ranks, eager and compiled (grouped-query attention there): each rank's output
    chunks, and the whole inputs' gradients summed over the ranks' chunks."""
    cases = [(False, 4), (True, 2)]
    _spawn(2, cp_worker.rings_against_sdpa, str(tmp_path), cases)
    for compiled, heads in cases:
        got = torch.load(tmp_path / f"ring2-{'compiled' if compiled else 'eager'}-{heads}.pt")
        torch.testing.assert_close(got["got"], got["expected"], rtol=0, atol=RING)
        for g, e in zip(got["grads"], got["expected_grads"]):
            torch.testing.assert_close(g, e, rtol=0, atol=RING)


def _check_against_one_process(report, model, dropout, packed, size=2, length=32):
    losses, params, held_out = cp_worker.one_process(model, dropout, packed=packed,
                                                     length=length)
    for mode, got in report.items():
        assert f"context=Context(dim='cp', size={size}" in got["layout"], mode
        assert "units=()" not in got["layout"], got["layout"]  # per block, the default
        _close(got, losses, params)
        # fx.evaluate runs the whole parameters on the model as it was (whole sequences):
        # within what the parameters' rounding moves a loss of order 3
        assert abs(got["eval"] - held_out) <= PARAMS, (got["eval"], held_out)
        assert mode != "compiled" or got["graphs"] == 1, got["graphs"]


def _close(got, losses, params):
    if losses is not None:
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses),
                                   rtol=0, atol=LOSS)
    for k, p in params.items():
        torch.testing.assert_close(got["params"][k], p, rtol=0, atol=PARAMS)


def _one_process_from(checkpoint, model, dropout, data):
    """The checkpoint restored onto one process, trained on ``data``'s whole sequences."""
    like = fx.TrainState.create(cp_worker.MODELS[model](dropout), fx.optim.adamw(1e-2))
    one = fx.checkpoint.restore(checkpoint, like=like)
    step = fx.make_train_step(cp_worker.whole_loss)
    for batch in data:
        one, _ = step(one, batch)
    return one.params


# The compat legs (torch 2.11, 2.15: not slow) run the ring's own test and the Llama's: the
# ring op traced and trained per block on those torches; the rest runs on the pinned torch.
@pytest.mark.parametrize("model,dropout,packed", [
    ("llama", 0.0, False), pytest.param("gpt2", 0.1, True, marks=pytest.mark.slow)],
    ids=["llama", "gpt2-dropout-packed"])
def test_context_parallel_trains_as_one_process_on_the_whole_sequences(tmp_path, model,
                                                                      dropout, packed):
    """2 ranks, each sequence of 32 tokens in 4 chunks of 8 (a head and a tail per rank): 10
    steps, eager and compiled, against one process on the global batch. Llama (grouped-query
    attention, rotary positions) through the ring, also with transformers' activation
    checkpointing, which runs each layer's ring again in the backward; GPT-2 (learned
    positions) with residual and embedding dropout 0.1, each rank drawing one process's masks
    at its positions, on packed documents (three a row, positions restarting at each), whose
    masks one process's transformers makes from the positions."""
    modes = ("eager", "compiled") + (("checkpointed",) if model == "llama" else ())
    _spawn(2, cp_worker.context_steps, str(tmp_path), model, modes, dropout=dropout,
           packed=packed)
    report = torch.load(tmp_path / "steps.pt")
    _check_against_one_process(report, model, dropout, packed)
    if model == "llama":  # 2 layers, 10 steps: the ring op run per layer in the forward
        # (eager), and again in the recompute when checkpointed (not served from a cache)
        assert report["eager"]["ring_calls"] == 20, report["eager"]["ring_calls"]
        assert report["checkpointed"]["ring_calls"] == 40, report["checkpointed"]["ring_calls"]


@pytest.mark.slow
def test_fsdp_by_context_by_tensor_parallel_on_eight_ranks_trains_as_one_process(tmp_path):
    """2 x 2 x 2 (dp, cp, tp): Llama on packed documents, the parameters sharded over dp x cp
    and split by transformers' plan over tp, the batch split over dp only, each sequence over
    cp; eager and compiled (one graph). Its checkpoint after 5 steps resumes on 2 x 2 x 2 with
    the uninterrupted run's digest, and on 4 x 2 x 1 (dp, cp) and on one process within the
    layouts' rounding of it. GPT-2 with dropout through a ring of 8: 16 chunks of 4 tokens
    (data ranks draw masks of their own, as data parallelism does: dropout equals one process's
    on context ranks only). The Llama through the ring on HSDP x CP (replicate, shard, cp)."""
    _spawn(8, cp_worker.eight_ranks, str(tmp_path))
    losses, params, _ = cp_worker.one_process("llama", packed=True)
    resumed = torch.load(tmp_path / "resume.pt")
    uninterrupted, same, other = resumed["runs"]
    assert "DeviceMesh((dp_cp=4, tp=2)" in uninterrupted["layout"]
    assert "DeviceMesh((shard=8)" in other["layout"], other["layout"]  # FSDP over dp x cp
    assert "context=Context(dim='cp', size=2" in other["layout"], other["layout"]
    _close({**uninterrupted, "losses": resumed["losses"]}, losses, params)
    assert same["digest"] == uninterrupted["digest"]
    _close(other, None, uninterrupted["params"])
    data = cp_worker.batches(10, packed=True)[5:]
    _close({"params": _one_process_from(tmp_path / "c", "llama", 0.0, data)}, None,
           uninterrupted["params"])
    _check_against_one_process(torch.load(tmp_path / "llama.pt"), "llama", 0.0, True)
    _check_against_one_process(torch.load(tmp_path / "gpt2.pt"), "gpt2", 0.1, False, size=8,
                               length=64)
    hsdp = torch.load(tmp_path / "hsdp.pt")
    assert "DeviceMesh((replicate=2, shard_cp=4)" in hsdp["eager"]["layout"], hsdp
    _check_against_one_process(hsdp, "llama", 0.0, False)


@pytest.mark.slow
def test_a_context_parallel_checkpoint_resumes_exactly_and_on_one_process(tmp_path):
    """GPT-2 with dropout on 2 context-parallel ranks, through the ring: a run restored from
    its checkpoint after 5 steps ends, 5 steps later, with the uninterrupted run's digest (the
    same layout); the checkpoint restored onto one process, trained on the whole sequences,
    ends within the layouts' rounding of it."""
    _spawn(2, cp_worker.context_resume, str(tmp_path))
    uninterrupted, back = torch.load(tmp_path / "resume.pt")["runs"]
    assert back["digest"] == uninterrupted["digest"]
    one = _one_process_from(tmp_path / "c", "gpt2", 0.1, cp_worker.batches(10)[5:])
    _close({"params": one}, None, uninterrupted["params"])
