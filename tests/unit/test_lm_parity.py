"""Gradient accumulation of a language model weighs every token alike, as ``transformers.Trainer``
does (``num_items_in_batch``): a GPT-2 trained by the Trainer with 4 accumulated micro-batches
of padded sequences, and by fxtrain with ``fx.losses.causal_lm`` and ``multi_steps(adamw, 4)``,
ends with the same parameters and logs the same losses, but for float32 rounding. The plain mean
of the micro-batches' means (a loss_fn returning a plain tensor) is far from both."""

import pytest
import torch

import fxtrain as fx
from helpers import TRACED, extra, graph_count

LR, B1, B2 = 1e-2, 0.9, 0.999
EVERY_K, UPDATES, ROWS, LENGTH, VOCAB, WIDTH = 4, 10, 2, 16, 64, 32

# Both sides compute the same gradients with float32 sums grouped differently (the Trainer
# backpropagates each micro-batch's sum over tokens / the update's token count and adds the
# gradients; fxtrain multiplies each micro-batch's mean gradient by its count and divides their
# sum by the update's count): they differ by rounding, ~1e-9 absolute for gradients summed from
# terms of ~1e-2. Adam's step lr * m / (sqrt(v) + eps) turns an error d in a gradient near 0
# into up to lr * d / eps (some are 0 in exact arithmetic: the attention's key bias, as a shift
# common to every key leaves the softmax as it is): eps = 1e-6 (on both sides) keeps that near
# 1e-5 per update, where torch's default 1e-8 would let rounding move such a parameter by a
# tenth of a step (measured: 2e-4 after one update for some data).
EPS = 1e-6
# Parameters of |p| up to ~1.1, moved ~0.1 by 10 updates of lr 1e-2: measured 7e-6 at most
# from the Trainer's (eager and compiled), and 2e-5 at most between one full batch and its 4
# micro-batches over 8 data seeds. 5e-5 is a two-hundredth of one step's lr, far below what
# weighing the micro-batches alike moves (0.14 from the Trainer's; 2e-2 in one update, where
# Adam's first step, lr * g / (|g| + eps), flips the sign of some small gradients).
ATOL = 5e-5
# The logged losses (~4.2) are float32 means of the same terms: measured within 5.5e-7, about
# one ulp (1.3e-7 relative).
LOSS_RTOL = 1e-6


def _gpt2():
    transformers = extra("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=WIDTH, vocab_size=VOCAB,
                                     n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # a causal LM's loss type: the Trainer then counts the shifted labels in num_items_in_batch
    # (without one it counts position 0 too, and its loss is no longer the mean per token)
    model.loss_type = "ForCausalLM"
    return model


def _sequences(n, seed=0):
    """``n`` right-padded sequences of 6 to 16 real tokens: ``attention_mask`` 1 on those, the
    labels the input ids but -100 on padding, so every micro-batch holds its own token count."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g) * mask  # 0 pads
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _micro_batches(data):
    n = data["input_ids"].shape[0]
    return [{k: v[i:i + ROWS] for k, v in data.items()} for i in range(0, n, ROWS)]


def _token_mean(state, params, batch):
    out = state.apply(params, input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"], use_cache=False)
    return fx.losses.causal_lm(out.logits, batch["labels"])


def _plain_mean(state, params, batch):
    return _token_mean(state, params, batch).value  # a plain tensor: every micro-batch alike


def _trained(loss_fn, tx, batches, compiled=False):
    """The state after one step per batch, from ``_gpt2()``, and each step's metrics."""
    state = fx.TrainState.create(_gpt2(), tx, seed=0)
    step = fx.make_train_step(loss_fn)
    if compiled:  # the weighing's promise is the trace's: see helpers.TRACED
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def _accumulated(loss_fn, batches, compiled=False):
    tx = fx.optim.multi_steps(fx.optim.adamw(LR, B1, B2, EPS, weight_decay=0.0), every_k=EVERY_K)
    return _trained(loss_fn, tx, batches, compiled)


def _largest_gap(params, reference):
    return max(float((params[name] - ref).abs().max()) for name, ref in reference.items())


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """The Trainer's 10 updates of 4 micro-batches of 2 sequences, in order: its logged loss per
    update and its final parameters; and the micro-batches, for fxtrain to take in that order."""
    transformers = extra("transformers")
    data = _sequences(UPDATES * EVERY_K * ROWS)
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("trainer")), per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=EVERY_K, max_steps=UPDATES, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        adam_beta1=B1, adam_beta2=B2, adam_epsilon=EPS, max_grad_norm=0.0, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        train_sampling_strategy="sequential", remove_unused_columns=False)
    model = _gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    # With accumulation the Trainer adds each micro-batch's loss, each its sum over tokens
    # divided by the update's token count, and logs that sum once per update (logging_steps=1):
    # the mean over the update's tokens.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == UPDATES
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params, _micro_batches(data)


def _update_means(metrics):
    """Each update's loss from its micro-steps' per-token means and token counts."""
    out = []
    for u in range(0, len(metrics), EVERY_K):
        group = metrics[u:u + EVERY_K]
        total = sum(float(m["loss"]) * float(m["loss_count"]) for m in group)
        out.append(total / sum(float(m["loss_count"]) for m in group))
    return out


@pytest.mark.parametrize("compiled", [
    pytest.param(False, id="eager"),
    pytest.param(True, id="compiled", marks=pytest.mark.slow),  # Dynamo's trace: ~12 s
])
def test_accumulation_matches_the_hf_trainer_token_for_token(trainer_run, compiled):
    """fxtrain's token-weighted accumulation reaches the Trainer's parameters, and its micro-steps'
    losses, weighed by their token counts, give the loss the Trainer logs for each update."""
    hf_losses, hf_params, batches = trainer_run
    graphs = graph_count()
    state, metrics = _accumulated(_token_mean, batches, compiled)
    if compiled:  # token counts are tensors: one graph for the 40 micro-steps
        assert graph_count() - graphs == 1
    counts = [int(m["loss_count"]) for m in metrics]
    assert counts == [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(set(counts)) > 1  # the micro-batches' token counts differ: weighing matters
    gap = _largest_gap(state.params, hf_params)
    assert gap < ATOL, f"largest parameter gap to the Trainer: {gap:.3g}"
    torch.testing.assert_close(torch.tensor(_update_means(metrics), dtype=torch.float64),
                               torch.tensor(hf_losses, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0.0)


def test_the_plain_mean_of_micro_batches_is_far_from_the_trainer(trainer_run):
    """The test above can fail: accumulating the micro-batches' own means, each alike (a loss_fn
    returning a plain tensor), ends far from the Trainer's parameters."""
    _, hf_params, batches = trainer_run
    state, metrics = _accumulated(_plain_mean, batches)
    assert "loss_count" not in metrics[0]
    gap = _largest_gap(state.params, hf_params)
    assert gap > 100 * ATOL, f"largest parameter gap to the Trainer: {gap:.3g}"


def test_one_full_batch_equals_four_weighted_micro_batches():
    """One AdamW update on 8 sequences, and the same 8 as 4 micro-batches of 2 accumulated by
    multi_steps with their token counts: the same parameters, but for float32 rounding (Adam's
    first update is lr * g / (|g| + eps), which rounding changes only where |g| is near eps);
    the plain mean of the 4 means is far from it."""
    data = _sequences(EVERY_K * ROWS, seed=1)
    whole, _ = _trained(_token_mean, fx.optim.adamw(LR, B1, B2, EPS, weight_decay=0.0), [data])
    micro = _micro_batches(data)
    accumulated, _ = _accumulated(_token_mean, micro)
    gap = _largest_gap(accumulated.params, whole.params)
    assert gap < ATOL, f"largest parameter gap to the full batch's update: {gap:.3g}"
    plain, _ = _accumulated(_plain_mean, micro)
    gap = _largest_gap(plain.params, whole.params)
    assert gap > 100 * ATOL, f"the plain mean's gap to the full batch's update: {gap:.3g}"
