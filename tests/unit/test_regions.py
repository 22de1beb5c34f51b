"""fx.regional: a model's blocks traced and compiled once inside the one step (issue 62)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from helpers import TRACED, graph_count


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.25)

    def forward(self, h):
        return h + self.drop(self.down(F.gelu(self.up(self.norm(h)))))


class Net(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.dropout(self.embed(x), 0.1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def loss_fn(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def setup(depth=3):
    torch.manual_seed(0)
    state = fx.TrainState.create(Net(depth), fx.optim.adamw(1e-2), seed=3)
    g = torch.Generator().manual_seed(1)
    return state, (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))


def trained(step, state, batch, n=3):
    for _ in range(n):
        state, metrics = step(state, batch)
    return state, metrics


def recording(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(TRACED)(gm, example_inputs)
    return backend


def test_blocks_compile_once_in_one_graph_and_train_the_same_bits():
    """One graph, its blocks calls of one subgraph, no recompiles; the same bits as the step
    without regions, dropout included (each layer continues the keyed stream where it stands),
    eager or compiled."""
    state, batch = setup()
    regional = fx.regional(state)
    assert regional.layout.regions == ("blocks.0", "blocks.1", "blocks.2")
    graphs = []
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=recording(graphs))
    got = trained(step, regional, batch)[0]
    assert graph_count() == 1 and len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if "invoke_subgraph" in str(n.target)]
    assert len(calls) == 3 and len({n.args[0].target for n in calls}) == 1  # one subgraph
    plain = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    want = trained(plain, state, batch)[0]
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    eager = trained(fx.make_train_step(loss_fn), regional, batch)[0]  # the blocks as they are
    assert fx.tree_digest(eager.params) == fx.tree_digest(
        trained(fx.make_train_step(loss_fn), state, batch)[0].params)


def test_a_layer_adds_a_call_not_its_ops():
    """Dynamo's graph of the step holds one subgraph at every depth, and a layer more adds a
    call of it (and its parameters' inputs and AdamW update) where the step without regions
    adds every op of the block's forward again. Only Dynamo's graph is read, so the backend
    notes it and compiles nothing (the subgraphs' higher-order op runs only traced): 24 CPU-s
    through AOTAutograd at depths 2 and 6, 10 so at 2 and 4."""
    class Noted(Exception):
        pass

    def noting(gm, example_inputs):
        raise Noted(gm)

    def graph(depth, regional):
        torch._dynamo.reset()
        state, batch = setup(depth)
        step = torch.compile(fx.make_train_step(loss_fn, autodiff="autograd"), fullgraph=True,
                             backend=noting)
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
            step(fx.regional(state) if regional else state, batch)
        (gm,) = failed.value.inner_exception.args
        return len([m for n, m in gm.named_children() if "subgraph" in n]), len(gm.graph.nodes)

    (sub2, regional2), (sub4, regional4) = graph(2, True), graph(4, True)
    plain2, plain4 = graph(2, False)[1], graph(4, False)[1]
    assert sub2 == sub4 == 1
    per_layer, plain_per_layer = (regional4 - regional2) / 2, (plain4 - plain2) / 2
    assert per_layer < plain_per_layer - 10, (per_layer, plain_per_layer)


def test_blocks_by_name_or_class_and_refusals():
    state, _ = setup()
    assert fx.regional(state, [Block]).layout.regions == ("blocks.0", "blocks.1", "blocks.2")
    assert fx.regional(state, ["blocks.1"]).layout.regions == ("blocks.1",)
    assert type(fx.regional(state).module.blocks[0]).__name__ == "RegionalBlock"
    assert type(state.module.blocks[0]).__name__ == "Block"  # the state given is unchanged
    with pytest.raises(ValueError, match="'blocks.9' is not a submodule"):
        fx.regional(state, ["blocks.9"])
    with pytest.raises(ValueError, match="already regions"):
        fx.regional(fx.regional(state))
    lone = fx.TrainState.create(nn.Linear(2, 2), fx.optim.sgd(0.1))
    with pytest.raises(ValueError, match="name them"):
        fx.regional(lone)
    trained_module = fx.trained_module(fx.regional(state))
    assert type(trained_module.blocks[0]) is Block  # the skeleton as it was
