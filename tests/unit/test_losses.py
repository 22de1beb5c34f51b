"""``fx.losses``: a loss that says what it averages over (``Mean(total, count)``), and the
step, ``multi_steps``, the ranks and the logged means weighing every item alike by it: the
update of micro-batches or ranks equals the update of the one batch that holds them all."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dist_worker
import fxtrain as fx
from dist_worker import lm_batches, lm_loss, lm_model
from helpers import TRACED
from helpers_losses import ATOL
from helpers_remat import run


def plain_loss(state, params, batch):
    return lm_loss(state, params, batch).value  # a 0-d tensor: the plain mean


def full(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def updated(loss_fn, batches, every_k, compiled=False):
    tx = fx.optim.sgd(0.5)
    state = fx.TrainState.create(lm_model(), fx.optim.multi_steps(tx, every_k) if every_k > 1
                                 else tx, seed=0)
    step = fx.make_train_step(loss_fn, donate=False)
    step = torch.compile(step, fullgraph=True, backend=TRACED) if compiled else step
    return run(step, state, batches)


def largest_gap(a, b):
    return max(float((a.params[k] - b.params[k]).abs().max()) for k in a.params)


def test_causal_lm_is_the_mean_over_labelled_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=g)
    labels = torch.randint(0, 7, (2, 6), generator=g)
    labels[0, 4:], labels[1, 1:3] = -100, -100
    loss = fx.losses.causal_lm(logits, labels)
    targets = labels[:, 1:]
    assert int(loss.count) == int((targets != -100).sum()) == 6
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), targets.reshape(-1))
    torch.testing.assert_close(loss.value, expected)
    unshifted = fx.losses.causal_lm(logits, labels, shift=False)
    assert int(unshifted.count) == int((labels != -100).sum())
    torch.testing.assert_close(unshifted.value,
                               F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)))


def test_a_mean_of_nothing_is_zero_and_bad_values_are_named():
    assert float(fx.losses.Mean(torch.tensor(0.0), torch.tensor(0)).value) == 0.0
    with pytest.raises(TypeError, match="total must be a 0-d tensor, got a tensor of shape"):
        fx.losses.Mean(torch.ones(2), torch.tensor(2))
    with pytest.raises(TypeError, match="total must be floating point"):
        fx.losses.Mean(torch.tensor(3), torch.tensor(2))
    with pytest.raises(ValueError, match=r"logits must be \(batch, length, vocab\)"):
        fx.losses.causal_lm(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))


@settings(max_examples=12, deadline=None)
@given(k=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_weighted_micro_batches_give_the_full_batch_update(k, seed):
    """Micro-batches of any token counts, accumulated by multi_steps: the update of the one
    batch that holds them all. The plain mean weighs each micro-batch alike instead (the
    multi_steps of before, kept for a plain loss)."""
    batches = lm_batches(n=k, seed=seed)
    whole, _ = updated(lm_loss, [full(batches)], every_k=1)
    weighted, metrics = updated(lm_loss, batches, every_k=k)
    assert largest_gap(weighted, whole) < ATOL
    counts = [int(m["loss_count"]) for m in metrics]
    assert counts == [int((b[1][:, 1:] != -100).sum()) for b in batches]
    plain, _ = updated(plain_loss, batches, every_k=k)
    by_hand = {n: p.clone() for n, p in lm_model().state_dict().items()}
    for batch in batches:  # the plain mean: each micro-batch's mean gradient counts 1/k
        state = fx.TrainState.create(lm_model(), fx.optim.sgd(0.5), seed=0)
        grads = torch.func.grad(lambda p: plain_loss(state, p, batch))(state.params)
        for n in by_hand:
            by_hand[n] -= 0.5 * grads[n] / k
    assert all((plain.params[n] - by_hand[n]).abs().max() < ATOL for n in by_hand)


def test_weighing_matters_for_these_batches():
    """The test above can fail: with these token counts the plain mean of the micro-batches'
    means is far from the full batch's update."""
    batches = lm_batches(n=4)
    whole, _ = updated(lm_loss, [full(batches)], every_k=1)
    plain, _ = updated(plain_loss, batches, every_k=4)
    assert largest_gap(plain, whole) > 100 * ATOL


def test_a_compiled_weighted_step_is_one_graph_and_matches_eager():
    batches = lm_batches(n=8)  # two updates of 4 micro-batches, every token count different
    eager, _ = updated(lm_loss, batches, every_k=4)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled, metrics = updated(lm_loss, batches, every_k=4, compiled=True)
    assert counts["stats"]["unique_graphs"] == 1  # counts are tensors: no recompile
    assert largest_gap(compiled, eager) < ATOL
    assert set(metrics[0]) >= {"loss", "loss_count"}


def test_the_logged_and_evaluated_loss_is_the_mean_over_every_token():
    """fit's epoch means and fx.evaluate weigh each batch's loss by its token count."""
    batches = lm_batches(n=4)
    state = fx.TrainState.create(lm_model(), fx.optim.sgd(0.5), seed=0)
    seen, epochs = [], []
    record = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: seen.append((float(e.metrics["loss"]),
                                              float(e.metrics["loss_count"]))),
        on_epoch_end=lambda s, e: epochs.append(float(e.metrics["loss"])))
    state = fx.fit(state, fx.make_train_step(lm_loss), batches, max_epochs=1,
                   callbacks=[record], progress=False)
    weighted = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)
    assert epochs == [pytest.approx(weighted, rel=1e-6)]
    assert epochs[0] != pytest.approx(sum(loss for loss, _ in seen) / len(seen), rel=1e-3)
    evaluated = fx.evaluate(fx.make_eval_step(lm_loss), state, batches)
    ids, labels = full(batches)
    expected = lm_loss(state, state.params, (ids, labels)).value
    torch.testing.assert_close(evaluated["loss"], expected)


def test_a_multi_steps_checkpoint_from_before_the_weights_restores(tmp_path):
    """A checkpoint written before MultiStepsState had acc_weight (its five fields) restores
    into today's state, the missing field at its initial value; any other missing leaf is
    still refused."""
    from typing import Any, NamedTuple

    class MultiStepsState(NamedTuple):  # the state as it was, under the same name
        mini_step: torch.Tensor
        gradient_step: torch.Tensor
        inner_state: Any
        acc_grads: Any
        skip_state: Any = None

    tx = fx.optim.multi_steps(fx.optim.sgd(0.5), every_k=2)
    state = fx.TrainState.create(lm_model(), tx, seed=0)
    state, _ = fx.make_train_step(plain_loss)(state, lm_batches(n=1)[0])
    old = state.replace(opt_state=MultiStepsState(*state.opt_state[:5]))
    manager = fx.checkpoint.CheckpointManager(tmp_path / "ckpt")
    manager.save(old, force=True)
    manager.wait()
    restored = manager.restore(like=state)
    assert isinstance(restored.opt_state, fx.optim.MultiStepsState)
    assert float(restored.opt_state.acc_weight) == 0.0
    assert fx.tree_digest(restored) == fx.tree_digest(state)
    with pytest.raises(fx.checkpoint.CheckpointMismatchError,
                       match="missing from the checkpoint"):
        manager.restore(like=state.replace(params={**state.params, "extra": torch.zeros(1)}))


def test_a_count_that_is_no_count_is_refused_and_nothing_averages_to_zero():
    """Issue 60, hole 9: a fractional or negative count was taken (the step weighs the
    gradient by it, and its metric cast it to int64), and Mean(3., 0).value was 3 where the
    docstring says 0."""
    assert float(fx.losses.Mean(torch.tensor(3.0), torch.tensor(0)).value) == 0.0
    for count in (torch.tensor(2.5), torch.tensor(4.0), torch.tensor(True)):
        with pytest.raises(TypeError, match=f"count must be an integer tensor .*got "
                                            f"{count.dtype}; count the items"):
            fx.losses.Mean(torch.tensor(3.0), count)
    with pytest.raises(ValueError, match=r"count must be >= 0 \(the number of items the total "
                                         r"sums over\), got -2"):
        fx.losses.Mean(torch.tensor(3.0), torch.tensor(-2))
    step = torch.compile(lambda t, c: fx.losses.Mean(t, c).value, fullgraph=True,
                         backend=TRACED)
    assert float(step(torch.tensor(3.0), torch.tensor(2))) == 1.5  # no host read: compiles
    with pytest.raises(ValueError, match="count must be >= 0"):
        step(torch.tensor(3.0), torch.tensor(-2))
    per_row = torch.func.vmap(lambda t, c: fx.losses.Mean(t, c).value)
    torch.testing.assert_close(per_row(torch.tensor([3.0, 4.0]), torch.tensor([3, 0])),
                               torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("bad", [13, -7])
def test_loss_parallel_refuses_a_label_outside_the_vocabulary_naming_causal_lm(bad):
    """Issue 61: on logits split along the vocabulary (a DTensor Shard(-1), loss parallel) a
    label outside the vocabulary matched no rank's columns and counted with a finite loss.
    Refused, eager and compiled, by the loss the user called (causal_lm, not the chunked loss
    whose check it shares), naming the label and the vocabulary; -100 is no label: taken, and
    the loss is the plain one's. On a 1-rank gloo mesh: the same path as on several ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from helpers_distributed import free_port
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        whole, labels = torch.randn(2, 6, 13, generator=g), torch.randint(0, 13, (2, 6),
                                                                           generator=g)
        labels[1, 3] = -100
        logits = distribute_tensor(whole, fx.sharding.mesh(), [Shard(-1)])
        total = lambda x, y: fx.losses.causal_lm(x, y).total  # noqa: E731
        compiled = torch.compile(total, fullgraph=True, backend=TRACED)
        for loss in (total, compiled):
            torch.testing.assert_close(loss(logits, labels),
                                       fx.losses.causal_lm(whole, labels).total)
        labels[0, 2] = bad
        message = (rf"^fx\.losses\.causal_lm: label {bad} is not a token of the head's "
                   r"vocabulary of 13 .*ignore_index -100")
        for loss in (total, compiled):
            with pytest.raises(ValueError, match=message):
                loss(logits, labels)
    finally:
        torch.distributed.destroy_process_group()
