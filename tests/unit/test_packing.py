"""Packed sequences (``fx.data.pack_documents``, ``document_mask``): documents end to end in rows,
attention kept inside each, the loss counting only real targets, so packed training gives the
padded batches' per-token loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtrain as fx
from helpers import TRACED, extra, padded_documents, token_documents

# Packed and padded rows run the same sums in other shapes (other matmul blockings, other
# softmax lengths): float32 rounding of sums of at most a few hundred terms of order 1, far
# below what attending across documents or counting a padding target moves (1e-2 and more).
ATOL = 2e-5

documents = st.lists(st.lists(st.integers(1, 31), min_size=0, max_size=20), max_size=12)


@settings(max_examples=60, deadline=None)
@given(docs=documents, length=st.integers(2, 16), split=st.booleans())
def test_packing_keeps_every_token_in_order_and_each_target_once(docs, length, split):
    if not any(docs):
        with pytest.raises(ValueError, match="no tokens to pack"):
            fx.data.pack_documents(docs, length, split=split)
        return
    packed = fx.data.pack_documents(docs, length, split=split)
    ids, labels, positions = (packed[k].reshape(-1) for k in ("input_ids", "labels",
                                                              "position_ids"))
    starts = torch.cat([torch.tensor([True]), positions[1:] != positions[:-1] + 1])
    kept = [t for t, lab, s in zip(ids.tolist(), labels.tolist(), starts.tolist())
            if lab != -100 or s]
    assert [t for t in kept if t != 0] == [t for d in docs for t in d]  # pad_id 0 is no token
    assert all(packed[k].shape[1] == length for k in packed)
    assert (labels[starts] == -100).all()  # no target across a segment start
    targets = int((labels != -100).sum())
    if not split and all(len(d) <= length for d in docs):  # whole documents: every target kept
        assert targets == sum(max(len(d) - 1, 0) for d in docs)
    assert targets <= sum(max(len(d) - 1, 0) for d in docs)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="length must be an int of at least 2"):
        fx.data.pack_documents([[1, 2]], 1)
    with pytest.raises(TypeError, match="document 1 holds something other than int"):
        fx.data.pack_documents([[1, 2], [1.5]], 4)
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, length\)"):
        fx.data.document_mask(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("split", [False, True])
def test_packed_rows_read_only_the_documents_each_row_needs_and_are_pack_documents_rows(split):
    docs, read = token_documents(n=9), []

    def streamed():
        for document in docs:
            read.append(document)
            yield document

    rows = fx.data.packed_rows(streamed(), 8, split=split)
    first = next(rows)
    assert len(read) < len(docs)  # a row is out before the stream is read through
    rows = [first, *rows]
    for name, column in fx.data.pack_documents(docs, 8, split=split).items():
        assert torch.equal(torch.stack([row[name] for row in rows]), column)
    with pytest.raises(ValueError, match="length must be an int"):
        fx.data.packed_rows(streamed(), 1)  # said at the call, before any document is read


def _gpt2(dropout=0.0):
    transformers = extra("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=32, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout))


def hf_loss(state, params, batch):
    """transformers reads the segments from position_ids (no attention_mask): its SDPA path
    builds the block-diagonal causal mask."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = state.apply(params, **inputs, use_cache=False).logits
    return fx.losses.causal_lm(logits, batch["labels"])


def test_packed_rows_train_a_transformers_model_as_padded_batches_do():
    docs = token_documents()
    packed, padded = fx.data.pack_documents(docs, 16), padded_documents(docs)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    start = fx.TrainState.create(_gpt2(), fx.optim.sgd(0.5), seed=0)
    (a, ma), (b, mb) = (fx.make_train_step(hf_loss, donate=False)(start, batch)
                        for batch in (packed, padded))  # a step per batch structure
    assert int(ma["loss_count"]) == int(mb["loss_count"]) == sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=0, atol=ATOL)
    for k in a.params:  # the same gradients: SGD moved every parameter alike
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=ATOL)


class TinyGPT(nn.Module):
    """One causal attention block that takes the mask it is given (document_mask)."""

    def __init__(self, vocab=32, width=16):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(32, width)
        self.qkv, self.head = nn.Linear(width, 3 * width), nn.Linear(width, vocab)

    def forward(self, ids, positions, mask):
        h = self.embed(ids) + self.pos(positions)
        q, k, v = self.qkv(h)[:, None].chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0]
        return self.head(h + attended)


def own_loss(state, params, batch):
    positions = batch["position_ids"]
    logits = state.apply(params, batch["input_ids"], positions,
                         fx.data.document_mask(positions))
    return fx.losses.causal_lm(logits, batch["labels"])


def test_document_mask_gives_a_model_of_your_own_the_padded_loss():
    docs = token_documents(seed=2)
    packed = fx.data.pack_documents(docs, 16)
    padded = padded_documents(docs)
    width = padded["input_ids"].shape[1]
    padded["position_ids"] = torch.arange(width).expand(len(docs), width)
    state = fx.TrainState.create(TinyGPT(), fx.optim.sgd(0.5), seed=0)
    del padded["attention_mask"]
    (a, ma), (b, mb) = (torch.compile(fx.make_train_step(own_loss, donate=False),
                                      fullgraph=True, backend=TRACED)(state, batch)
                        for batch in (packed, padded))
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=0, atol=ATOL)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_keyed_dropout_works_on_packed_rows_compiled_and_repeats():
    """With dropout, SDPA (with the packed mask) runs as keyed math: one graph, and the same
    key draws the same masks."""
    packed = fx.data.pack_documents(token_documents(), 16)
    batches = fx.data.Batches(packed, 2, seed=0)
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        counts = torch._dynamo.utils.counters
        counts.clear()
        state = fx.TrainState.create(_gpt2(dropout=0.1), fx.optim.adamw(1e-2), seed=3)
        step = torch.compile(fx.make_train_step(hf_loss), fullgraph=True, backend=TRACED)
        runs.append(fx.fit(state, step, batches, max_steps=3, progress=False))
        assert counts["stats"]["unique_graphs"] == 1
    assert fx.tree_digest(runs[0]) == fx.tree_digest(runs[1])


def test_negative_token_ids_are_refused():
    """Issue 60, hole 9: a negative id was packed (a -100 became an ignored label)."""
    with pytest.raises(ValueError, match=r"document 1 holds a negative token id \(-100\)"):
        fx.data.pack_documents([[1, 2], [3, -100, 4]], 4)
    with pytest.raises(ValueError, match=r"pad_id must be a token id >= 0, got -1"):
        fx.data.pack_documents([[1, 2]], 4, pad_id=-1)
