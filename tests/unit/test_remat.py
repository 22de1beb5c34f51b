"""Gradients by ``torch.autograd.grad`` (``make_train_step(..., autodiff="autograd")``) and
activation checkpointing on them (``fx.remat``): the same gradients as ``torch.func``'s, one
compiled graph, keyed randomness recomputed alike."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from helpers import TRACED
from helpers_remat import ATOL, LR, run, same


@pytest.fixture(autouse=True)
def inductor_locality_restored():
    """A compiled step with fx.remat turns off Inductor's reorder_for_locality for the process
    (see fx.remat): put it back, so later tests in this worker compile as they would alone."""
    import torch._inductor.config as inductor

    before = inductor.reorder_for_locality
    yield
    inductor.reorder_for_locality = before


def test_a_compiled_remat_step_turns_off_the_locality_reordering():
    import torch._inductor.config as inductor

    inductor.reorder_for_locality = True
    state, batches = make(policy="nothing_saveable")
    torch.compile(fx.make_train_step(loss_fn, autodiff="autograd"), fullgraph=True,
                  backend="aot_eager")(state, batches[0])
    assert inductor.reorder_for_locality is False


class Block(nn.Module):
    def __init__(self, width, dropout):
        super().__init__()
        self.up, self.down, self.dropout = nn.Linear(width, 4 * width), \
            nn.Linear(4 * width, width), dropout

    def forward(self, h):
        return h + self.down(F.dropout(F.gelu(self.up(h)), self.dropout, self.training))


class Net(nn.Module):
    """Blocks, each through ``fx.remat`` with ``policy`` (None: called plainly)."""

    def __init__(self, width=16, depth=3, dropout=0.0, policy=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(depth))
        self.head = nn.Linear(width, 5)
        self.policy = policy

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.policy is None else fx.remat(block, x, policy=self.policy)
        return self.head(x)


def loss_fn(state, params, batch):
    x, y = batch
    logits = state.apply(params, x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def make(dtype=torch.float32, tx=None, **net):
    torch.manual_seed(0)
    model = Net(**net).to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g, dtype=dtype),
                torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    return fx.TrainState.create(model, tx or fx.optim.adamw(1e-2), seed=0), batches


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
def test_autograd_gradients_equal_torch_func_gradients(compiled, dropout):
    """The same program differentiated two ways, on this machine: the same bits (keyed dropout
    included). Compiled, one block: Inductor's compile of each took 5 CPU-s a block."""
    state, batches = make(tx=fx.optim.sgd(LR), dropout=dropout, depth=1 if compiled else 3)
    steps = [fx.make_train_step(loss_fn, autodiff=a, donate=False) for a in ("func", "autograd")]
    if compiled:
        # keyed dropout through Inductor's kernels; without dropout the two traces suffice
        backend = "inductor" if dropout else TRACED
        steps = [torch.compile(s, fullgraph=True, backend=backend) for s in steps]
    (a, ma), (b, mb) = (run(s, state, batches) for s in steps)
    if not compiled:  # the same autograd engine and kernels, in the same order
        assert same(a, b)
        assert all(torch.equal(x["loss"], y["loss"]) and
                   torch.equal(x["grad_norm"], y["grad_norm"]) for x, y in zip(ma, mb))
    else:  # two traced programs: Inductor may fuse them apart (see ATOL)
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], rtol=0, atol=ATOL)
        torch.testing.assert_close(mb[-1]["loss"], ma[-1]["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_recomputes_keyed_dropout_alike_eager_in_float64(policy):
    """Recomputing a region draws its masks again from the same key: the steps are bitwise
    those that keep every activation (float64, eager)."""
    kept, batches = make(torch.float64, dropout=0.3, policy="everything_saveable")
    again, _ = make(torch.float64, dropout=0.3, policy=policy)
    step = fx.make_train_step(loss_fn, autodiff="autograd", donate=False)
    assert same(run(step, kept, batches)[0], run(step, again, batches)[0])


def test_remat_in_a_compiled_step_is_one_graph_and_matches_within_float32_rounding():
    """Two blocks, so one region's recomputation starts from the other's kept output (Inductor
    took 5 CPU-s a block)."""
    kept, batches = make(tx=fx.optim.sgd(LR), dropout=0.3, policy="everything_saveable",
                         depth=2)
    again, _ = make(tx=fx.optim.sgd(LR), dropout=0.3, policy="nothing_saveable", depth=2)
    eager = fx.make_train_step(loss_fn, autodiff="autograd", donate=False)
    reference, ref_metrics = run(eager, kept, batches)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(fx.make_train_step(loss_fn, autodiff="autograd", donate=False),
                             fullgraph=True)
    state, metrics = run(compiled, again, batches)
    assert counts["stats"]["unique_graphs"] == 1  # three calls, one graph, no recompile
    for k, p in reference.params.items():  # compiled against eager (see ATOL)
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=ATOL)
    torch.testing.assert_close(metrics[-1]["loss"], ref_metrics[-1]["loss"], rtol=1e-5, atol=0)


class Attention(nn.Module):
    """A causal self-attention block on ``F.scaled_dot_product_attention``, no dropout."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.heads = heads

    def forward(self, h):
        b, t, c = h.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(h).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.proj(y.transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_a_region_around_torch_attention_compiles_and_matches(policy):
    """SDPA's kernels are tagged random (they take a dropout probability, even at 0), and the
    compiled step's recomputation pass refused any region holding one: a transformer without
    dropout could not use fx.remat compiled. The kernels' outputs are now kept. One block: a
    region holds the attention as two did (regions in a row: the test above)."""
    class Stack(nn.Module):
        def __init__(self, policy):
            super().__init__()
            self.blocks, self.policy = nn.ModuleList([Attention()]), policy

        def forward(self, h):
            for block in self.blocks:
                h = fx.remat(block, h, policy=self.policy)
            return h

    def mse(state, params, batch):
        x, y = batch
        return (state.apply(params, x) - y).square().mean()

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g))
               for _ in range(3)]
    states = []
    for p in ("everything_saveable", policy):
        torch.manual_seed(0)
        states.append(fx.TrainState.create(Stack(p), fx.optim.sgd(LR), seed=0))
    eager = fx.make_train_step(mse, autodiff="autograd", donate=False)
    reference, ref_metrics = run(eager, states[0], batches)
    compiled = torch.compile(fx.make_train_step(mse, autodiff="autograd", donate=False),
                             fullgraph=True)
    state, metrics = run(compiled, states[1], batches)
    for k, p in reference.params.items():  # compiled against eager (see ATOL)
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=ATOL)
    torch.testing.assert_close(metrics[-1]["loss"], ref_metrics[-1]["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_remat_needs_the_autograd_path_and_a_known_policy(compiled):
    """The errors themselves, from fit's call of a compiled step too (not Dynamo's report)."""
    def fit_one(state, **kwargs):
        step = fx.make_train_step(loss_fn, **kwargs)
        step = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        fx.fit(state, step, batches[:1], max_steps=1)

    state, batches = make(policy="nothing_saveable")
    with pytest.raises(ValueError, match="autodiff='autograd'"):
        fit_one(state)
    bad, _ = make(policy="dots")
    with pytest.raises(ValueError, match="unknown policy 'dots'.*nothing_saveable"):
        fit_one(bad, autodiff="autograd")
    with pytest.raises(ValueError, match="autodiff must be one of 'auto', 'func', 'autograd'"):
        fx.make_train_step(loss_fn, autodiff="jax")


def test_a_remat_region_that_draws_from_the_global_generator_is_refused():
    def loss_with_noise(state, params, batch):
        x, y = batch
        noisy = fx.remat(lambda h: h + torch.randn_like(h), x)
        return F.cross_entropy(state.apply(params, noisy), y)

    state, batches = make()
    step = fx.make_train_step(loss_with_noise, autodiff="autograd")
    with pytest.raises(Exception, match="randn_like"):
        step(state, batches[0])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_remat_region_that_reads_a_value_on_the_host_is_refused(compiled):
    def loss_with_branch(state, params, batch):
        x, y = batch
        h = fx.remat(lambda h: h * 2 if h.sum().item() > 0 else h, x)
        return F.cross_entropy(state.apply(params, h), y)

    state, batches = make()
    step = fx.make_train_step(loss_with_branch, autodiff="autograd")
    step = torch.compile(step, fullgraph=True, backend=TRACED) if compiled else step
    with pytest.raises(Exception, match=r"reads a tensor's value on the host \(\.item\(\)\)"):
        fx.fit(state, step, batches[:1], max_steps=1)


def test_remat_outside_a_step_or_without_gradients_just_calls():
    state, batches = make(policy="nothing_saveable")
    x = batches[0][0]
    assert Net(policy="nothing_saveable")(x).shape == (8, 5)  # no step: a plain call
    evaluated = fx.make_eval_step(lambda s, b: {"loss": loss_fn(s, s.params, b)[0]})(
        state, batches[0])
    assert torch.isfinite(evaluated["loss"])


def test_fit_trains_with_remat_and_resumes_exactly(tmp_path):
    """fit with a compiled remat step: a run stopped at a checkpoint and resumed ends with the
    uninterrupted run's state."""
    def fresh():
        return make(dropout=0.3, policy="nothing_saveable")

    _, batches = fresh()
    data = fx.data.Batches((torch.cat([b[0] for b in batches]),
                            torch.cat([b[1] for b in batches])), 4, seed=0)
    step = torch.compile(fx.make_train_step(loss_fn, autodiff="autograd"), fullgraph=True,
                         backend=TRACED)
    whole = fx.fit(fresh()[0], step, data, max_steps=8)  # fit donates the state it is given
    with fx.checkpoint.CheckpointManager(tmp_path / "c") as manager:
        fx.fit(fresh()[0], step, data, max_steps=4, checkpoint=manager)
    with fx.checkpoint.CheckpointManager(tmp_path / "c") as manager:
        resumed = fx.fit(fresh()[0], step, data, max_steps=8, checkpoint=manager)
    assert int(resumed.step) == 8 and same(whole, resumed)
