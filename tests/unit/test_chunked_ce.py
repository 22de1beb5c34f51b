"""``chunked_causal_lm``: ``fx.losses.causal_lm`` of an LM head's logits, taken from the head's
input and weight a chunk of tokens at a time. The same value, count and gradients as the plain
loss on every gradient path (autograd, ``torch.func``, compiled), and less memory."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtrain as fx
import fxtrain.losses._chunked as cce
from fxtrain.losses._chunked import chunked_causal_lm
from helpers import TRACED, graph_count
from helpers_losses import lm_case, plain, value_and_grads

ROOT = Path(__file__).resolve().parents[2]


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 9), width=st.integers(1, 6),
       vocab=st.integers(2, 13), chunk_size=st.integers(1, 8), with_bias=st.booleans(),
       shift=st.booleans(), autodiff=st.sampled_from(["autograd", "func"]),
       seed=st.integers(0, 10**6))
def test_the_value_count_and_gradients_are_the_plain_loss(batch, length, width, vocab,
                                                          chunk_size, with_bias, shift,
                                                          autodiff, seed):
    """Any shapes (lengths that are no multiple of the chunk, a single token, rows without a
    label), with and without a bias, shifted or not, by autograd and by torch.func."""
    hidden, weight, bias, labels = lm_case(batch, length, width, vocab, seed)
    bias = bias if with_bias else None
    expected = value_and_grads(plain, autodiff, hidden, weight, bias, labels, shift=shift)
    got = value_and_grads(chunked_causal_lm, autodiff, hidden, weight, bias, labels,
                          shift=shift, chunk_size=chunk_size)
    assert got[2].item() == expected[2].item()
    torch.testing.assert_close(got[:2], expected[:2])
    for g, e, x in zip(got[3], expected[3], (hidden, weight, bias)):
        assert g.shape == x.shape and g.dtype == x.dtype
        torch.testing.assert_close(g, e)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("nesting", ["vmap of grad", "grad of vmap"])
def test_it_composes_with_vmap(nesting):
    """Per-sequence gradients (vmap of grad) and the gradient of a vmapped loss (grad of
    vmap: the batched hidden states say they require no grad, yet are tracked) are the plain
    loss's."""
    hidden, weight, _, labels = lm_case(3, 7, 5, 11, seed=0)
    labels[-1, 2] = 4  # every row with a label

    def one(loss_fn):
        return lambda h, w, y: loss_fn(h[None], w, y[None], chunk_size=4).total

    def grads(loss_fn):
        if nesting == "vmap of grad":
            per_row = torch.func.grad(one(loss_fn), argnums=(0, 1))
            return torch.func.vmap(per_row, in_dims=(0, None, 0))(hidden, weight, labels)
        summed = lambda h, w: torch.func.vmap(one(loss_fn), in_dims=(0, None, 0))(
            h, w, labels).sum()
        return torch.func.grad(summed, argnums=(0, 1))(hidden, weight)

    torch.testing.assert_close(grads(chunked_causal_lm), grads(plain))


def test_without_a_gradient_only_the_loss_is_computed():
    """Under no_grad (an eval step), the value alone: nothing requires grad after it."""
    hidden, weight, bias, labels = lm_case(2, 6, 4, 9, seed=1)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        loss = chunked_causal_lm(hidden, weight, labels, bias=bias, chunk_size=3)
        expected = plain(hidden, weight, labels, bias=bias)
    assert not loss.total.requires_grad
    torch.testing.assert_close(loss.value, expected.value)


@pytest.mark.parametrize("autocast", [True, False])
def test_bfloat16_heads_give_the_plain_loss_in_its_precision(autocast):
    """Under autocast (float32 weight, bf16 products) or in bf16 throughout, the loss is
    taken in float32 and the gradients come back in the inputs' dtypes, within bf16 rounding
    of the plain loss's."""
    dtype = torch.float32 if autocast else torch.bfloat16
    hidden, weight, _, labels = lm_case(2, 40, 16, 50, seed=2, dtype=dtype)
    context = torch.autocast("cpu", torch.bfloat16, enabled=autocast)
    with context:
        expected = value_and_grads(plain, "autograd", hidden, weight, None, labels)
        got = value_and_grads(chunked_causal_lm, "autograd", hidden, weight, None, labels,
                              chunk_size=16)
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[1], expected[1], rtol=1e-2, atol=1e-2)
    for g, e, x in zip(got[3], expected[3], (hidden, weight)):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3)


# -- the compiled kernel ---------------------------------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    """Every block takes the compiled softmax kernel (not only those of a real vocabulary):
    the list says, per call, whether it ran compiled."""
    monkeypatch.setattr(cce, "FUSED_MIN_LOGITS", 0)
    monkeypatch.setattr(cce, "_failed", set())
    calls, fused = [], cce._fused_grad_

    def spy(*args):
        loss = fused(*args)
        calls.append(loss is not None)
        return loss

    monkeypatch.setattr(cce, "_fused_grad_", spy)
    return calls


@pytest.mark.parametrize("autodiff,with_bias", [("autograd", True), ("func", False)])
def test_the_compiled_kernel_gives_the_plain_loss(kernel_calls, autodiff, with_bias):
    """Chunks of 4 rows and a last one of 2 (the rows are dynamic: one compile), rows without
    a label, with a bias or not, by autograd and by torch.func."""
    hidden, weight, bias, labels = lm_case(2, 6, 5, 13, seed=3)
    bias = bias if with_bias else None
    expected = value_and_grads(plain, autodiff, hidden, weight, bias, labels)
    got = value_and_grads(chunked_causal_lm, autodiff, hidden, weight, bias, labels,
                          chunk_size=4)
    assert kernel_calls == [True] * 3 and graph_count() == 1
    torch.testing.assert_close(got[:2], expected[:2])
    for g, e in zip(got[3], expected[3]):
        torch.testing.assert_close(g, e)


def test_the_compiled_kernel_composes_with_vmap_and_autocast(kernel_calls):
    """Per-sequence gradients (vmap of grad: one call per sequence), and a bfloat16 head
    under autocast, whose gradient the kernel writes over the bfloat16 logits."""
    hidden, weight, _, labels = lm_case(3, 7, 5, 11, seed=0)
    one = lambda loss_fn: lambda h, w, y: loss_fn(h[None], w, y[None], chunk_size=4).total
    per_row = lambda loss_fn: torch.func.vmap(torch.func.grad(one(loss_fn), argnums=(0, 1)),
                                              in_dims=(0, None, 0))(hidden, weight, labels)
    torch.testing.assert_close(per_row(chunked_causal_lm), per_row(plain))
    assert kernel_calls and all(kernel_calls)
    hidden, weight, _, labels = lm_case(2, 40, 16, 50, seed=2)
    with torch.autocast("cpu", torch.bfloat16):
        expected = value_and_grads(plain, "autograd", hidden, weight, None, labels)
        got = value_and_grads(chunked_causal_lm, "autograd", hidden, weight, None, labels,
                              chunk_size=16)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-2, atol=1e-2)
    for g, e in zip(got[3], expected[3]):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3)
    assert all(kernel_calls)


def test_a_compiled_step_calls_the_compiled_kernel(kernel_calls):
    """The step's graph calls the operator whole, which calls the kernel: two graphs, the
    step's and the kernel's (compiled once, on the first chunk), and the plain loss's steps."""
    expected, expected_losses = trained(lm_loss("head", chunked=False), "func", False, False)
    got, losses = trained(lm_loss("head", chunked=True), "func", True, False)
    assert graph_count() == 2 and len(kernel_calls) == 12 and all(kernel_calls)
    torch.testing.assert_close(losses, expected_losses)
    for name in expected.params:
        torch.testing.assert_close(got.params[name], expected.params[name], rtol=0, atol=1e-5)


def test_where_dynamo_compiles_nothing_the_eager_ops_run(kernel_calls, monkeypatch):
    """Under a stance that runs everything eagerly the kernel's Python would allocate every
    intermediate block: it does nothing, and the eager in-place ops run; where compiling
    fails, a warning, and the eager ops from then on, on that device."""
    hidden, weight, _, labels = lm_case(2, 6, 5, 13, seed=4)
    expected = value_and_grads(plain, "autograd", hidden, weight, None, labels)
    with torch.compiler.set_stance("force_eager"):
        got = value_and_grads(chunked_causal_lm, "autograd", hidden, weight, None, labels,
                              chunk_size=4)
    assert kernel_calls == [False] * 3 and graph_count() == 0
    torch.testing.assert_close(got[1], expected[1])

    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

    monkeypatch.setattr(cce, "_compiled_softmax_grad", lambda: broken)
    with pytest.warns(RuntimeWarning, match="compiling its softmax kernel for cpu failed"):
        got = value_and_grads(chunked_causal_lm, "autograd", hidden, weight, None, labels,
                              chunk_size=4)
    assert kernel_calls == [False] * 4 and cce._failed == {"cpu"}  # once, then not tried
    torch.testing.assert_close(got[3], expected[3])


def test_a_toy_head_runs_eagerly():
    """Below FUSED_MIN_LOGITS logits a block, compiling would cost more than it saves."""
    hidden, weight, _, labels = lm_case(2, 6, 5, 13, seed=4)
    value_and_grads(chunked_causal_lm, "autograd", hidden, weight, None, labels)
    assert graph_count() == 0


def test_wrong_arguments_are_named():
    hidden, weight, bias, labels = lm_case(2, 5, 4, 7, seed=0)
    with pytest.raises(ValueError, match=r"hidden must be \(batch, length, width\)"):
        chunked_causal_lm(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="weight must be .* width 4; got \\(7, 3\\)"):
        chunked_causal_lm(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match=r"labels must be \(batch, length\) = \(2, 5\)"):
        chunked_causal_lm(hidden, weight, labels[:, :4])
    with pytest.raises(TypeError, match="labels must be integer token ids"):
        chunked_causal_lm(hidden, weight, labels.float())
    with pytest.raises(ValueError, match=r"bias must be \(vocab,\) = \(7,\)"):
        chunked_causal_lm(hidden, weight, labels, bias=bias[:3])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            chunked_causal_lm(hidden, weight, labels, chunk_size=bad)


# -- inside a train step -------------------------------------------------------------------

VOCAB = 11


class TinyLM(nn.Module):
    """Embedding, one layer, and a head the forward does not run: it returns the hidden
    states, and the loss takes the head's weight (or the embedding's, tied) from ``params``."""

    def __init__(self, width=8, head_bias=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB, bias=head_bias)

    def forward(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def lm_loss(head, chunked):
    """A loss_fn taking the head from ``params``: ``"head"``, ``"head+bias"`` or ``"tied"``
    (the embedding's weight)."""
    weight_name = "embed.weight" if head == "tied" else "head.weight"

    def loss_fn(state, params, batch):
        ids, labels = batch
        hidden = state.apply(params, ids)
        bias = params["head.bias"] if head == "head+bias" else None
        if chunked:
            return chunked_causal_lm(hidden, params[weight_name], labels, chunk_size=4,
                                     bias=bias)
        return plain(hidden, params[weight_name], labels, bias=bias)

    return loss_fn


def step_batches():
    """Three batches, each with other labelled positions (one a row of padding only)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(3):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        labels = ids.clone()
        labels[0, 3 + i:] = -100
        if i == 1:
            labels[1] = -100
        out.append((ids, labels))
    return out


def initial(head_bias):
    torch.manual_seed(0)
    return TinyLM(head_bias=head_bias)


def trained(loss_fn, autodiff, compiled, head_bias):
    state = fx.TrainState.create(initial(head_bias), fx.optim.sgd(0.5), seed=0)
    step = fx.make_train_step(loss_fn, autodiff=autodiff, donate=False)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    losses = []
    for batch in step_batches():
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


@pytest.mark.parametrize("autodiff,compiled,head", [
    ("func", False, "head"), ("func", False, "tied"), ("autograd", False, "head+bias"),
    ("func", True, "head"), ("autograd", True, "head"), ("func", True, "head+bias")])
def test_a_train_step_with_it_trains_as_with_the_plain_loss(autodiff, compiled, head):
    """Three SGD steps, eager or compiled into one graph (the label masks differ from batch to
    batch without a recompile): the parameters and losses of the plain loss's eager steps,
    within float32 rounding."""
    bias = head == "head+bias"
    expected, expected_losses = trained(lm_loss(head, chunked=False), autodiff, False, bias)
    got, losses = trained(lm_loss(head, chunked=True), autodiff, compiled, bias)
    if compiled:
        assert graph_count() == 1
    torch.testing.assert_close(losses, expected_losses)
    for name in expected.params:
        torch.testing.assert_close(got.params[name], expected.params[name], rtol=0, atol=1e-5)
    start = initial(bias).state_dict()
    trained_weight = "embed.weight" if head == "tied" else "head.weight"
    assert float((got.params[trained_weight] - start[trained_weight]).abs().max()) > 1e-2


# -- labels outside the vocabulary (issue 60, hole 3) ------------------------------------------

@pytest.mark.parametrize("bad", [13, -7, 10**7])
def test_a_label_outside_the_vocabulary_is_refused_on_the_compiled_kernels_path(kernel_calls,
                                                                                  bad):
    """The compiled kernel's one-hot matched nothing for such a label, and the loss came back
    finite, training the token toward no target; causal_lm raises. Refused, naming the label,
    the vocabulary and the fix, with or without a gradient, eager and in a compiled step."""
    hidden, weight, _, labels = lm_case(2, 6, 5, 13, seed=3)
    labels[0, 2] = bad
    message = rf"label {bad} .*vocabulary of 13 .*ignore_index -100.*len\(tokenizer\)"
    for autodiff in ("autograd", "func"):
        with pytest.raises(ValueError, match=message):
            value_and_grads(chunked_causal_lm, autodiff, hidden, weight, None, labels,
                            chunk_size=4)
    with pytest.raises(ValueError, match=message):
        chunked_causal_lm(hidden, weight, labels, chunk_size=4)  # no gradient: the eager ops
    with pytest.raises(ValueError, match=message):
        torch.func.vmap(lambda h, y: chunked_causal_lm(h[None], weight, y[None]).total)(
            hidden, labels)
    state = fx.TrainState.create(initial(False), fx.optim.sgd(0.5), seed=0)
    step = torch.compile(fx.make_train_step(lm_loss("head", chunked=True), donate=False),
                         fullgraph=True, backend=TRACED)
    ids, targets = step_batches()[0]
    targets[1, 4] = value = VOCAB if bad == 13 else bad
    with pytest.raises(ValueError, match=rf"label {value} .*vocabulary of {VOCAB} "):
        step(state, (ids, targets))
    labels[0, 2] = -100  # ignore_index is no label: taken
    chunked_causal_lm(hidden, weight, labels, chunk_size=4)


def test_integer_hidden_states_or_weights_are_refused():
    """Issue 60, hole 9: an integer weight or hidden state was taken (the products ran in
    integers)."""
    hidden, weight, bias, labels = lm_case(2, 5, 4, 7, seed=0)
    with pytest.raises(TypeError, match="hidden must be floating point .*got torch.int64"):
        chunked_causal_lm(hidden.long(), weight, labels)
    with pytest.raises(TypeError, match="weight must be floating point .*got torch.int32"):
        chunked_causal_lm(hidden, weight.int(), labels)
    with pytest.raises(TypeError, match="bias must be floating point .*got torch.int64"):
        chunked_causal_lm(hidden, weight, labels, bias=bias.long())
