"""The cheap forward work of a compiled train step recomputed in its backward
(``fxtrain._torch.recompute``): which forward tensors the rest of the graph still reads, the same
values, and the same steps compiled with the pass and without it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxtrain as fx
from fxtrain._torch import recompute as _recompute


def traced(fn, *args, forward: int):
    """``fn`` traced to ATen, its first ``forward`` ops annotated as a step's forward."""
    gm = make_fx(fn)(*args)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in ops[:forward]:
        node.meta["custom"] = dict(_recompute.FORWARD)
    return gm


def read_outside(graph, cheap: bool = False) -> list[str]:
    """The forward nodes that a node outside the forward reads (the cheap ones only), by op."""
    return sorted(str(n.target).split(".")[1] for n in graph.nodes if _recompute._forward(n)
                  and any(u.op == "call_function" and not _recompute._forward(u)
                          for u in n.users) and (_recompute._cheap(n) or not cheap))


def rerun(gm, *args):
    gm.recompile()
    return gm(*args)


def test_element_wise_work_is_recomputed_from_the_matrix_product_it_came_from():
    def fn(x, w):
        h = torch.mm(x, w)  # forward: kept (not cheap)
        g = F.gelu(h).mul(2.0).add(1.0)  # forward: cheap, so recomputed
        return torch.mm(g.t(), x)  # outside the forward

    x, w = torch.randn(4, 3), torch.randn(3, 5)
    gm = traced(fn, x, w, forward=4)
    expected = gm(x, w)
    assert read_outside(gm.graph) == ["add"]
    _recompute.recompute(gm.graph)
    assert read_outside(gm.graph) == ["mm"]
    assert torch.equal(rerun(gm, x, w), expected)  # the same eager ops, so the same bits


def test_masks_narrowing_casts_and_random_ops_are_kept():
    def fn(x, w):
        h = torch.mm(x, w)
        mask = h > 0  # boolean: a quarter of the floats it selects
        # narrower (Inductor's element-wise cast): a copy would keep the float32 alive
        low = torch.ops.prims.convert_element_type(h, torch.bfloat16)
        noise = torch.rand_like(h)  # random: never drawn twice
        return (torch.where(mask, h, 0.0) + low.float() + noise).sum()

    x, w = torch.randn(4, 3), torch.randn(3, 5)
    gm = traced(fn, x, w, forward=4)
    before = read_outside(gm.graph)
    _recompute.recompute(gm.graph)
    assert read_outside(gm.graph) == before == ["convert_element_type", "gt", "mm", "rand_like"]


def test_a_constant_is_made_again_rather_than_kept():
    def fn(x, w):
        h = torch.mm(x, w)
        zeros = torch.full(h.shape, 0.0)  # keyed dropout's zeros_like, as Inductor sees it
        return torch.where(h > 0, h, zeros).sum() + zeros.sum()

    x, w = torch.randn(4, 3), torch.randn(3, 5)
    gm = traced(fn, x, w, forward=3)
    expected = gm(x, w)
    assert "full" in read_outside(gm.graph)
    _recompute.recompute(gm.graph)
    assert read_outside(gm.graph) == ["gt", "mm"]
    assert torch.equal(rerun(gm, x, w), expected)


def test_a_long_chain_is_kept_every_few_ops_and_recomputed_in_between():
    links = 3 * _recompute.CHAIN

    def fn(x):
        chain = [x.mm(x)]
        for _ in range(links):
            chain.append(chain[-1] + 1.0)
        return sum(c.sum() for c in chain)  # every link read outside the forward

    x = torch.randn(3, 3)
    gm = traced(fn, x, forward=1 + links)
    expected = gm(x)
    assert read_outside(gm.graph).count("add") == links
    _recompute.recompute(gm.graph)
    # each add whose chain back to the product would repeat more than CHAIN ops is kept, and
    # the adds after it are recomputed from it
    assert read_outside(gm.graph) == ["add"] * (links // (_recompute.CHAIN + 1)) + ["mm"]
    assert torch.equal(rerun(gm, x), expected)


def test_a_graph_without_a_forward_is_left_as_it_is():
    gm = make_fx(lambda x: F.gelu(x.mm(x)).sum())(torch.randn(3, 3))
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    _recompute.recompute(gm.graph)
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.down(F.dropout(F.gelu(self.up(x)), 0.1, self.training))


def loss_fn(state, params, batch):
    x, y = batch
    return F.mse_loss(state.apply(params, x), y)


def train(autodiff: str, steps: int = 3):
    torch.manual_seed(0)
    state = fx.TrainState.create(MLP(), fx.optim.adamw(1e-2), seed=0)
    step = torch.compile(fx.make_train_step(loss_fn, autodiff=autodiff), fullgraph=True)
    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        state, metrics = step(state, (torch.randn(8, 16, generator=g),
                                      torch.randn(8, 4, generator=g)))
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


@pytest.fixture
def fresh_compiles(monkeypatch):
    """Every compile in the test runs Inductor's passes (no cached graph), and ours is seen. The
    C++ kernels stay cached by their source: a kernel that the pass changed is compiled again,
    one it left as it was is not (a cold build of each: 4 of a compile's 5 CPU-s here)."""
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    seen = []
    real = _recompute.recompute

    def spy(graph):
        before = read_outside(graph, cheap=True)
        real(graph)
        seen.append((before, read_outside(graph, cheap=True)))

    monkeypatch.setattr(_recompute, "recompute", spy)
    torch.compiler.reset()
    with inductor.patch(fx_graph_cache=False), functorch.patch(enable_autograd_cache=False):
        yield seen
    torch.compiler.reset()


@pytest.mark.parametrize("autodiff", ["func", "autograd"])
def test_a_compiled_step_keeps_no_element_wise_activation_and_trains_as_without_the_pass(
        autodiff, fresh_compiles, monkeypatch):
    state, losses = train(autodiff)
    [(before, after)] = fresh_compiles
    assert "where" in before, before  # dropout's output, kept for the second product
    assert after == [], after
    monkeypatch.setattr(_recompute, "recompute", lambda graph: None)
    torch.compiler.reset()
    plain, plain_losses = train(autodiff)
    # recomputed element-wise ops may be fused apart from where they were: float32 rounding
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.params, plain.params, rtol=1e-5, atol=1e-6)


def test_a_pass_the_user_set_runs_first_and_ours_after_it(fresh_compiles):
    import torch._inductor.config as inductor

    calls = []
    with inductor.patch(post_grad_custom_pre_pass=lambda graph: calls.append(1)):
        train("autograd", steps=1)
    assert calls == [1] and len(fresh_compiles) == 1
