"""Plain ``torch.utils.checkpoint`` and transformers' gradient checkpointing inside a train step
that takes its gradients with ``torch.autograd.grad`` (``autodiff="autograd"``): the recomputed
regions run on the step's parameters, in train mode, and draw the step's keyed masks again, so
the steps are those of the same model without checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxtrain as fx
from helpers import TRACED, extra
from helpers_remat import ATOL, LR, run, same

pytestmark = pytest.mark.compat  # Dynamo's settings for torch.utils.checkpoint: every torch


@pytest.fixture(autouse=True)
def dynamo_settings_restored():
    """An autograd step turns two Dynamo settings on while Dynamo traces it, and puts them
    back after (fxtrain._torch.traced_settings), but for a trace that Dynamo abandons (a
    refusal below): each test leaves them as it found them."""
    import torch._dynamo.config as dynamo

    before = dynamo.trace_autograd_ops, dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint
    yield
    dynamo.trace_autograd_ops, dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint = before


class Net(nn.Module):
    """Blocks with dropout, each through torch.utils.checkpoint when ``checkpointed``."""

    def __init__(self, checkpointed, reentrant=False, width=16, depth=3, dropout=0.3):
        super().__init__()
        self.embed = nn.Linear(width, width)  # so the first block's input needs a gradient
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(4 * width, width)) for _ in range(depth))
        self.head = nn.Linear(width, 5)
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def forward(self, h):
        h = self.embed(h)
        for block in self.blocks:
            h = h + (checkpoint(block, h, use_reentrant=self.reentrant) if self.checkpointed
                     else block(h))
        return self.head(h)


def loss_fn(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def make(checkpointed, dtype=torch.float32, **net):
    torch.manual_seed(0)
    model = Net(checkpointed, **net).to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g, dtype=dtype),
                torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    return fx.TrainState.create(model, fx.optim.sgd(LR), seed=0), batches


def step(compiled=False):
    made = fx.make_train_step(loss_fn, autodiff="autograd", donate=False)
    return torch.compile(made, fullgraph=True) if compiled else made


def test_eager_checkpointing_recomputes_on_the_steps_parameters_and_masks_float64():
    """Bitwise the steps without checkpointing (float64, eager, this machine): the recompute
    ran on the step's parameters (the module's own are on the meta device), in train mode,
    with the same keyed dropout masks; torch's generator is as it was."""
    plain, batches = make(False, torch.float64)
    checkpointed, _ = make(True, torch.float64)
    before = torch.get_rng_state()
    a, ma = run(step(), plain, batches)
    b, mb = run(step(), checkpointed, batches)
    assert same(a, b) and all(torch.equal(x["loss"], y["loss"]) for x, y in zip(ma, mb))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.is_meta for p in checkpointed.module.parameters())  # nothing left bound
    other, _ = make(True, torch.float64, dropout=0.0)  # the masks matter: the test can fail
    assert not same(run(step(), other, batches)[0], b)


def test_compiled_checkpointing_is_one_graph_and_equals_eager_within_float32_rounding():
    """Two blocks: a region's recomputation starts from the other's kept output (Inductor took
    5 CPU-s a block)."""
    plain, batches = make(False, depth=2)
    reference, _ = run(step(), plain, batches)
    counts = torch._dynamo.utils.counters
    checkpointed, _ = make(True, depth=2)
    state, _ = run(step(compiled=True), checkpointed, batches)
    assert counts["stats"]["unique_graphs"] == 1
    for k, p in reference.params.items():  # compiled against eager (see test_remat.ATOL)
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=ATOL)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_reentrant_variant_is_refused_with_the_fix(compiled):
    """Eager, torch refuses it in the backward; compiled, fxtrain sees the call. Either way
    fxtrain's message comes first (compiled, inside Dynamo's own error type)."""
    state, batches = make(True, reentrant=True)
    with pytest.raises(ValueError if not compiled else Exception) as caught:
        step(compiled)(state, batches[0])
    assert str(caught.value).startswith(("fxtrain: torch.utils.checkpoint(use_reentrant=True)",
                                         "ValueError: fxtrain: torch.utils.checkpoint"))
    assert "Pass use_reentrant=False" in str(caught.value)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_transformers_gradient_checkpointing_trains_as_without_it(compiled):
    """transformers' gradient_checkpointing_enable() (non-reentrant by default) on a GPT-2 with
    attention and residual dropout: the steps of the model without it (bitwise eager; within
    float32 rounding compiled, against eager). One layer: its region holds attention and MLP
    as each of two did (traced: 9.7 CPU-s at 2 layers)."""
    transformers = extra("transformers")

    def gpt2(enabled):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64,
                                         n_positions=16, attn_implementation="sdpa",
                                         resid_pdrop=0.1, embd_pdrop=0.0, attn_pdrop=0.1)
        model = transformers.GPT2LMHeadModel(config)
        if enabled:
            model.gradient_checkpointing_enable()
        return fx.TrainState.create(model, fx.optim.sgd(LR), seed=0)

    def lm_loss(state, params, ids):
        logits = state.apply(params, ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]
    made = fx.make_train_step(lm_loss, autodiff="autograd", donate=False)
    reference, _ = run(made, gpt2(False), batches)
    enabled = gpt2(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in enabled.module.modules())
    step = torch.compile(made, fullgraph=True, backend=TRACED) if compiled else made
    state, _ = run(step, enabled, batches)
    if compiled:  # test_remat.ATOL's bound: sums here are at most 128 terms (the MLP), 2
        # SGD steps of LR 0.1, so float32 rounding moves a parameter by under 1e-5
        for k, p in reference.params.items():
            torch.testing.assert_close(state.params[k], p, rtol=0, atol=ATOL)
    else:
        assert same(state, reference)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["plain", "dropout"])
def test_transformers_gradient_checkpointing_compiles_with_inductor(dropout):
    """Issue 60, hole 2: the default step of a GPT-2 with gradient_checkpointing_enable(),
    compiled with Inductor (the backend users get, not helpers.TRACED). At dropout 0, SDPA's
    kernels (tagged random by torch) inside a recomputed region failed the compile ("does not
    support RNG ops in recompute regions"); the step keeps their outputs. With dropout the masks
    are keyed, so the recomputation draws the same: the steps are those of the model without
    checkpointing, within float32 rounding (test_remat.ATOL: 2 SGD steps of LR 0.1, sums of
    at most 128 terms). One layer: its region holds the attention as two did (cold Inductor
    cache: 50 CPU-s at 2 layers, 36 at 1)."""
    transformers = extra("transformers")

    def gpt2(enabled):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64,
                                         n_positions=16, attn_implementation="sdpa",
                                         resid_pdrop=dropout, embd_pdrop=0.0, attn_pdrop=dropout)
        model = transformers.GPT2LMHeadModel(config)
        if enabled:
            model.gradient_checkpointing_enable()
        return fx.TrainState.create(model, fx.optim.sgd(LR), seed=0)

    def lm_loss(state, params, ids):
        logits = state.apply(params, ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]
    reference, ref_metrics = run(fx.make_train_step(lm_loss, donate=False), gpt2(False), batches)
    counts = torch._dynamo.utils.counters
    counts.clear()
    step = torch.compile(fx.make_train_step(lm_loss, donate=False), fullgraph=True)
    state, metrics = run(step, gpt2(True), batches)
    assert counts["stats"]["unique_graphs"] == 1
    for k, p in reference.params.items():
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=ATOL)
    torch.testing.assert_close(metrics[-1]["loss"], ref_metrics[-1]["loss"], rtol=1e-5, atol=0)
