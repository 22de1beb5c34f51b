"""fx.regional: a model's blocks traced and compiled once inside the one step (issue 62)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from fxtrain._torch import regions
from helpers import TRACED, extra, graph_count
from helpers_compile import Block, Net, loss_fn, setup, trained


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
    got, metrics = trained(step, regional, batch)
    assert graph_count() == 1 and len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if "invoke_subgraph" in str(n.target)]
    # two subgraphs, each called for every block: the block's forward and its AdamW update
    assert len(calls) == 6 and len({n.args[0].target for n in calls}) == 2
    plain = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    want, want_metrics = trained(plain, state, batch)
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert fx.tree_digest(got.opt_state) == fx.tree_digest(want.opt_state)
    assert torch.equal(metrics["grad_norm"], want_metrics["grad_norm"])
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

    def noting(gm, example_inputs):  # counted here: torch 2.15 empties the graph after
        raise Noted(len([m for n, m in gm.named_children() if "subgraph" in n]),  # a failure
                    len(gm.graph.nodes))

    def graph(depth, regional):
        torch._dynamo.reset()
        state, batch = setup(depth)
        step = torch.compile(fx.make_train_step(loss_fn, autodiff="autograd"), fullgraph=True,
                             backend=noting)
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:
            step(fx.regional(state) if regional else state, batch)
        return failed.value.inner_exception.args

    (sub2, regional2), (sub4, regional4) = graph(2, True), graph(4, True)
    plain2, plain4 = graph(2, False)[1], graph(4, False)[1]
    assert sub2 == sub4 == 2  # the block's forward, and its update
    per_layer, plain_per_layer = (regional4 - regional2) / 2, (plain4 - plain2) / 2
    assert per_layer < plain_per_layer - 10, (per_layer, plain_per_layer)


def updated_in_the_outer_graph(state, batch):
    """The regional step's state after 3 steps, its metrics, and the step's without regions,
    checking that the regional step's graph calls the blocks' forward region only."""
    graphs = []
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=recording(graphs))
    got, metrics = trained(step, fx.regional(state), batch)
    calls = [n for n in graphs[0].graph.nodes if "invoke_subgraph" in str(n.target)]
    assert graph_count() == 1 and len(calls) == 3  # the blocks' forward only
    plain = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    return (got, metrics), trained(plain, state, batch)


def test_an_update_that_tells_the_blocks_apart_stays_in_the_outer_graph():
    """A weight decay mask by name that decays one block's weights and not the others': the
    blocks' updates are not one region (inside it a block's names are its own), and the step
    trains the bits of the step without regions."""
    torch.manual_seed(0)
    tx = fx.optim.adamw(1e-2, weight_decay=0.5, mask=["blocks.0.up.weight", "head.weight"])
    state = fx.TrainState.create(Net(3), tx, seed=3)
    _, batch = setup()
    (got, metrics), (want, want_metrics) = updated_in_the_outer_graph(state, batch)
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert fx.tree_digest(got.opt_state) == fx.tree_digest(want.opt_state)
    assert torch.equal(metrics["grad_norm"], want_metrics["grad_norm"])


@pytest.mark.slow  # off the compat legs: the test above takes the same road there
def test_an_update_whose_state_a_region_cannot_carry_stays_in_the_outer_graph():
    """An elementwise update whose state holds a leaf that is neither a tensor nor a plain
    value (a dtype): the blocks' updates are not one region, and the step trains the bits of
    the step without regions."""
    adamw = fx.optim.adamw(1e-2)

    def init(params):
        return adamw.init(params), torch.float32

    def update(grads, state, params=None):
        updates, inner = adamw.update(grads, state[0], params)
        return updates, (inner, state[1])

    torch.manual_seed(0)
    tx = fx.optim.ElementwiseTransformation(init, update)
    state = fx.TrainState.create(Net(3), tx, seed=3)
    _, batch = setup()
    (got, metrics), (want, want_metrics) = updated_in_the_outer_graph(state, batch)
    assert got.opt_state[1] is torch.float32
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert fx.tree_digest(got.opt_state) == fx.tree_digest(want.opt_state)
    assert torch.equal(metrics["grad_norm"], want_metrics["grad_norm"])


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
    with pytest.raises(ValueError, match=r"blocks=\[\] names no block"):  # issue 75: silently none
        fx.regional(state, [])
    with pytest.raises(ValueError, match="has no submodule of class Conv1d"):
        fx.regional(state, [nn.Conv1d])
    lone = fx.TrainState.create(nn.Linear(2, 2), fx.optim.sgd(0.1))
    with pytest.raises(ValueError, match="name them"):
        fx.regional(lone)
    trained_module = fx.trained_module(fx.regional(state))
    assert type(trained_module.blocks[0]) is Block  # the skeleton as it was


def traces_of_regions(depth, key_of=None, monkeypatch=None):
    """How many times Dynamo traced a region's body for a step over ``depth`` blocks (the rest
    of the calls reuse a trace), with ``regions.key_of`` replaced where given."""
    from fxtrain._torch.traced_errors import run_while_tracing
    if key_of is not None:
        monkeypatch.setattr(regions, "key_of", run_while_tracing(key_of))
    torch._dynamo.reset()
    torch._dynamo.utils.compilation_time_metrics.pop("invoke_subgraph_trace", None)
    state, batch = setup(depth)
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    step(fx.regional(state), batch)
    return len(torch._dynamo.utils.compilation_time_metrics.get("invoke_subgraph_trace", []))


@pytest.mark.needs_torch(2, 12, "a region's trace reused for the other blocks (2.11 traces every call)")
def test_dynamo_traces_each_region_once_whatever_the_depth(monkeypatch):
    """The block's forward and its update are traced once each at any depth: the other
    blocks reuse the trace (the key). A key that differs per call (the reuse disabled)
    traces every block again, which this test would see."""
    assert traces_of_regions(2) == traces_of_regions(4) == 2
    calls = iter(range(10**6))
    assert traces_of_regions(4, lambda signature: next(calls), monkeypatch) == 8


class Windowed(Block):
    """A block whose forward reads its own Python attributes: a scale that differs by kind
    (every other block), and an index that numbers the blocks and is read only where a flag
    says so (transformers' ``layer_idx``)."""

    def __init__(self, i, scaled_by_index=False):
        super().__init__()
        self.scale, self.layer_idx = (1.0, 0.5)[i % 2], i
        self.scale_by_inverse_layer_idx = scaled_by_index

    def forward(self, h):
        out = super().forward(h) * self.scale
        return out / (self.layer_idx + 1) if self.scale_by_inverse_layer_idx else out


@pytest.mark.parametrize("scaled_by_index", [False, True])
def test_blocks_that_differ_in_their_attributes_are_traced_apart(scaled_by_index):
    """Blocks of one class whose attributes differ get a class of their own per kind (the
    index that numbers them does not split them, unless a flag of theirs names it), and the
    step trains the bits of the step without regions."""
    torch.manual_seed(0)
    net = Net(4)
    net.blocks = nn.ModuleList(Windowed(i, scaled_by_index) for i in range(4))
    state = fx.TrainState.create(net, fx.optim.adamw(1e-2), seed=3)
    _, batch = setup()
    regional = fx.regional(state)
    kinds = [type(b).__name__ for b in regional.module.blocks]
    assert kinds == (["RegionalWindowed", "RegionalWindowed_1", "RegionalWindowed_2",
                      "RegionalWindowed_3"] if scaled_by_index else
                     ["RegionalWindowed", "RegionalWindowed_1"] * 2)
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    got, metrics = trained(step, regional, batch)
    plain = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    want, want_metrics = trained(plain, state, batch)
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert fx.tree_digest(got.opt_state) == fx.tree_digest(want.opt_state)
    assert torch.equal(metrics["grad_norm"], want_metrics["grad_norm"])


@pytest.mark.slow
@pytest.mark.needs_torch(2, 13, "a layer that adds no kernel (2.11 traces every call; on 2.12 "
                               "a third block adds 6 kernels to 66)")
def test_a_layer_adds_no_kernel():
    """Inductor generates as many kernels for 3 blocks as for 2: each block's call of its
    region takes tensors the step has (its place in the keyed stream included: an operator's
    result, not a constant of its own, which Inductor compiled into a kernel per layer: 22 C++
    files more at 24 layers of GPT-2 than at 2)."""
    import torch._inductor.metrics

    counts = []
    for depth in (2, 3):
        torch._dynamo.reset()
        torch._inductor.metrics.reset()
        state, batch = setup(depth)
        step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)
        step(fx.regional(state), batch)
        counts.append(torch._inductor.metrics.generated_kernel_count)
    assert counts[0] == counts[1] > 0, counts


class Halving(Net):
    """Its blocks take inputs of two shapes: the batch halves after the first block."""

    def forward(self, x):
        h = F.dropout(self.embed(x), 0.1)
        for i, block in enumerate(self.blocks):
            h = block(h if i == 0 else h[: h.shape[0] // 2])
        return self.head(h)


def test_blocks_called_on_inputs_of_another_shape_are_traced_apart():
    """One block class, inputs of two shapes in one step: the reuse key tells them apart (a
    trace reused across shapes would not fit), and the step trains the bits of the step
    without regions."""
    torch.manual_seed(0)
    state = fx.TrainState.create(Halving(3), fx.optim.adamw(1e-2), seed=3)
    x, y = setup()[1]

    def loss(state, params, batch):
        out = state.apply(params, batch[0])
        return F.cross_entropy(out, batch[1][: out.shape[0]])

    step = torch.compile(fx.make_train_step(loss), fullgraph=True, backend=TRACED)
    got, metrics = trained(step, fx.regional(state), (x, y))
    plain = torch.compile(fx.make_train_step(loss), fullgraph=True, backend=TRACED)
    want, want_metrics = trained(plain, state, (x, y))
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert torch.equal(metrics["grad_norm"], want_metrics["grad_norm"])


class Numbered(Block):
    """A block whose forward reads the int that numbers it (``layer_idx``): as a scale, as a
    branch, as an index into a table of its own, or only for a cache it is never given."""

    def __init__(self, i, read):
        super().__init__()
        self.layer_idx, self.read = i, read
        self.register_buffer("table", torch.arange(1.0, 5.0))

    def forward(self, h, cache=None):
        out = super().forward(h) - h
        if self.read == "scale":
            out = out * (1 + self.layer_idx)
        elif self.read == "branch":
            out = torch.tanh(out) if self.layer_idx % 2 else torch.relu(out)
        elif self.read == "index":
            out = out * self.table[self.layer_idx]
        elif cache is not None:
            cache[self.layer_idx] = out
        return h + out


@pytest.mark.parametrize("read", ["scale", *(pytest.param(r, marks=pytest.mark.slow)
                                          for r in ("branch", "index", "cache"))])
def test_blocks_that_read_the_int_that_numbers_them_train_the_users_model(read):
    """Blocks of one class whose forward reads the int that numbers them (a scale, a branch, an
    index) are traced apart, said once; where it is read only for a cache, they share one
    trace. Either way the step trains the bits of the plain compiled step (issue 75, hole 1:
    every block ran block 0's trace)."""
    torch.manual_seed(0)
    net = Net(4)
    net.blocks = nn.ModuleList(Numbered(i, read) for i in range(4))
    state = fx.TrainState.create(net, fx.optim.adamw(1e-2), seed=3)
    batch = setup()[1]
    graphs = []
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=recording(graphs))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got, metrics = trained(step, fx.regional(state), batch)
    plain = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=TRACED)
    want, want_metrics = trained(plain, state, batch)
    assert fx.tree_digest(got.params) == fx.tree_digest(want.params)
    assert torch.equal(metrics["loss"], want_metrics["loss"])
    said = [str(w.message) for w in said if "fx.regional" in str(w.message)]
    if not regions.REUSES:  # torch 2.11 traces every call: nothing shared, nothing to check
        return
    called = {n.args[0].target for n in graphs[0].graph.nodes
              if "invoke_subgraph" in str(n.target)}
    kinds = {"scale": 4, "branch": 2, "index": 4, "cache": 1}[read]
    if kinds < 4:  # (Dynamo inlines a region called once: 4 kinds of 4 blocks leave none)
        assert len(called) == kinds + 1  # each kind's forward, and the blocks' one update
    if read == "cache":
        assert said == []
    else:
        assert len(said) == 1 and "differ in layer_idx" in said[0] and f"{kinds} kinds" in \
            said[0], said


@pytest.mark.parametrize("model", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_transformers_blocks_share_one_trace(model):
    """GPT-2's and Llama's blocks differ in ``layer_idx``, read only for a cache: the check
    finds their forwards alike, so they share one trace (the compile-once figure holds), with
    nothing said. On torch 2.11, which traces every call of a region (nothing shared, nothing
    checked), the regional step of both models traces and runs, with nothing said."""
    transformers = extra("transformers")
    torch.manual_seed(0)
    if model == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=32,
                                         n_positions=16)
        net = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=2,
                                          num_key_value_heads=1, hidden_size=16,
                                          intermediate_size=32, vocab_size=32)
        net = transformers.LlamaForCausalLM(config)
    state = fx.regional(fx.TrainState.create(net, fx.optim.adamw(1e-2)))
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))

    def lm_loss(state, params, batch):
        return state.apply(params, batch, labels=batch, use_cache=False).loss

    graphs = []
    step = torch.compile(fx.make_train_step(lm_loss), fullgraph=True, backend=recording(graphs))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        step(state, ids)
    assert [str(w.message) for w in said if "fx.regional" in str(w.message)] == []
    if regions.REUSES:
        calls = [n for n in graphs[0].graph.nodes if "invoke_subgraph" in str(n.target)]
        assert len({n.args[0].target for n in calls}) == 2  # one forward, one update
