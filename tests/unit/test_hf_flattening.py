"""transformers' ``DataCollatorWithFlattening`` as fxtrain's data: its one row of documents end to
end is ``fx.data.pack_documents(docs, length=<all their tokens>)``, and trains a transformers
model to the per-token loss and gradients of padded batches of the same documents, eager and
compiled. Its conventions, as of transformers 5.x (``data/data_collator.py``):

- one row ``(1, total_tokens)``, no padding: ``input_ids``, ``labels``, ``position_ids`` (int64);
  empty examples dropped;
- ``labels`` unshifted (the input ids, or an example's own ``labels``), the first of each
  document replaced by ``separator_id``: with the default ``-100`` these are pack_documents'
  labels, what ``fx.losses.causal_lm`` takes; any other value is a target;
- ``position_ids`` from ``position_ids_start`` (default 0: what GPT-2 needs) in each document;
- no ``attention_mask``: transformers' SDPA path builds the block-diagonal mask from the
  position restarts only when there is none.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtrain as fx
from helpers import TRACED, extra, graph_count, padded_documents, token_documents

transformers = extra("transformers")  # every test here needs it
if not hasattr(transformers, "DataCollatorWithFlattening"):
    pytest.skip(f"transformers {transformers.__version__} has no DataCollatorWithFlattening",
                allow_module_level=True)
Flattening = transformers.DataCollatorWithFlattening

# The flattened row and the padded rows run the same sums in other shapes (other matmul
# blockings, softmax lengths, reduction orders). In float32 each sum of n terms is off by about
# n * 2**-24 relative to the sum of the terms' magnitudes; here n is at most the 54 tokens of a
# batch (gradients) or a 16-wide row, so 1e-5 of a tensor's largest entry bounds it 10x over
# (runs differ by about 2e-7 of it). Attending across documents moves the loss by 1e-3 and more.
RTOL = 1e-5


def _close(actual, expected):
    """Equal within float32 rounding of sums over a batch: RTOL of the largest entry."""
    torch.testing.assert_close(actual, expected, rtol=RTOL,
                               atol=RTOL * float(expected.abs().max()))


def _examples(docs):
    """Documents as a tokenized dataset gives them to a collator."""
    return [{"input_ids": d} for d in docs]


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))


def hf_loss(state, params, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = state.apply(params, **inputs, use_cache=False).logits
    return fx.losses.causal_lm(logits, batch["labels"])


def _step(start, batch):
    """One eager SGD step of learning rate 1 from ``start``: the parameters move by the
    gradients."""
    return fx.make_train_step(hf_loss, donate=False)(start, batch)


def _same_step(start, a, b):
    """Two steps from ``start`` that took the same loss and the same gradients."""
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    assert int(metrics_a["loss_count"]) == int(metrics_b["loss_count"])
    _close(metrics_a["loss"], metrics_b["loss"])
    for k, p in start.params.items():
        _close(p - state_a.params[k], p - state_b.params[k])


documents = st.lists(st.lists(st.integers(1, 31), max_size=9), max_size=8)


@settings(max_examples=60, deadline=None)
@given(docs=documents, separator=st.sampled_from([-100, 0, 31]))
def test_the_collators_row_is_pack_documents_of_one_row(docs, separator):
    """Token for token the same row; the labels differ only where a document starts, and there
    only when ``separator_id`` is not -100 (the collator writes it, pack_documents -100)."""
    total = sum(len(d) for d in docs)
    if total < 2:
        return  # one token: pack_documents needs a row of 2
    flat = Flattening(separator_id=separator)(_examples(docs))
    packed = fx.data.pack_documents(docs, total)
    assert {k: (v.shape, v.dtype) for k, v in flat.items()} == {
        k: ((1, total), torch.int64) for k in ("input_ids", "labels", "position_ids")}
    assert flat["input_ids"].equal(packed["input_ids"])
    assert flat["position_ids"].equal(packed["position_ids"])
    starts = packed["position_ids"] == 0
    assert flat["labels"][~starts].equal(packed["labels"][~starts])
    assert (flat["labels"][starts] == separator).all()
    assert (packed["labels"][starts] == -100).all()


def test_an_examples_own_labels_are_kept_but_for_its_first():
    """A prompt masked in an example's ``labels`` stays masked; the first label still becomes
    the separator."""
    flat = Flattening()([{"input_ids": [5, 6, 7, 8], "labels": [5, -100, 7, 8]},
                         {"input_ids": [9, 10], "labels": [9, 10]}])
    assert flat["labels"].tolist() == [[-100, -100, 7, 8, -100, 10]]


@pytest.mark.parametrize("extras", [{}, {"return_flash_attn_kwargs": True,
                                         "return_seq_idx": True}], ids=["defaults", "fa-kwargs"])
def test_flattened_batches_train_as_padded_batches_do(extras):
    """Through ``fx.data.Batches(examples, collate=collator)``, eager. FlashAttention's
    ``cu_seq_lens_*``/``max_length_*`` and ``seq_idx`` are ignored by SDPA: the same step."""
    docs = token_documents()
    data = fx.data.Batches(_examples(docs), len(docs), shuffle=False,
                           collate=Flattening(**extras))
    flat = next(iter(data))
    assert flat["input_ids"].numel() < padded_documents(docs)["input_ids"].numel()  # no padding
    start = fx.TrainState.create(_gpt2(), fx.optim.sgd(1.0), seed=0)
    flat_step, padded_step = _step(start, flat), _step(start, padded_documents(docs))
    assert int(flat_step[1]["loss_count"]) == sum(len(d) - 1 for d in docs)
    _same_step(start, flat_step, padded_step)


def test_compiled_flattened_batches_of_changing_length_train_as_padded_batches_do():
    """Compiled in one graph: every batch has its own length, so the second one recompiles the
    step with a dynamic length (Dynamo's automatic dynamic shapes) and the rest reuse it. Each
    compiled step is the eager step on the padded batch of the same documents. (The two
    compiles take about 17 CPU seconds, most of this file's time.)"""
    docs = token_documents(n=9, seed=3)
    data = fx.data.Batches(_examples(docs), 3, shuffle=False, collate=Flattening())
    start = fx.TrainState.create(_gpt2(), fx.optim.sgd(1.0), seed=0)
    step = torch.compile(fx.make_train_step(hf_loss, donate=False), fullgraph=True,
                         backend=TRACED)
    lengths = []
    for i, flat in enumerate(data):
        lengths.append(flat["input_ids"].shape[1])
        _same_step(start, step(start, flat), _step(start, padded_documents(docs[3 * i:3 * i + 3])))
    assert len(set(lengths)) == 3
    assert graph_count() == 2


@pytest.mark.parametrize("change", ["no position_ids", "an attention_mask of ones"])
def test_the_mask_between_documents_comes_from_position_ids_alone(change):
    """Not vacuous: without ``position_ids`` (positions run on across the row), or with an
    ``attention_mask`` beside them (transformers then takes that mask and looks for no
    documents), tokens attend across documents and the gradients are others: some parameter's
    by a tenth of its largest entry (RTOL is 1e-5), where the loss at initialization moves
    only by 1e-3 to 1e-2."""
    docs = token_documents()
    flat = Flattening()(_examples(docs))
    if change == "no position_ids":
        del flat["position_ids"]
    else:
        flat["attention_mask"] = torch.ones_like(flat["input_ids"])
    start = fx.TrainState.create(_gpt2(), fx.optim.sgd(1.0), seed=0)
    (crossed, _), (padded, _) = _step(start, flat), _step(start, padded_documents(docs))
    gaps = [(crossed.params[k] - padded.params[k]).abs().max() / (p - padded.params[k]).abs().max()
            for k, p in start.params.items()]
    assert max(gaps) > 0.1
