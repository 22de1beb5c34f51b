"""What keyed randomness costs the compiler: a step derives its keys with fxtrain's own operators,
once, and dropout adds little to compiling a step (its inlined hash chains once made a 2-layer
GPT-2 step compile 5x slower). The measurements: benchmarks/compile_time.py (its smoke run is
checked in test_benchmarks.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import fxtrain as fx

NO_CACHES = {"fx_graph_cache": False}


def chained_dropout_loss(draws):
    """A loss whose model output goes through ``draws`` dropouts."""

    def loss_fn(state, params, batch):
        x, y = batch
        out = state.apply(params, x)
        for _ in range(draws):
            out = F.dropout(out, 0.1)
        return F.cross_entropy(out, y)

    return loss_fn


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_keys_come_from_operator_calls_one_per_16_draws():
    torch.manual_seed(0)
    state = fx.TrainState.create(nn.Linear(16, 4), fx.optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(chained_dropout_loss(20)), fullgraph=True)
    with torch._inductor.config.patch(NO_CACHES):
        _, sources = run_and_get_code(step, state, batch())
    code = "\n".join(sources)
    assert code.count("= torch.ops.fxtrain.fold_in.default(") == 1  # the step's key
    assert code.count("= torch.ops.fxtrain.fold_in_range.default(") == 2  # 20 draws' keys
    assert "fxtrain.stream_key" not in code


def test_a_region_takes_its_keys_from_one_operator_call_per_16_draws():
    """Inside a region (``fx.regional``'s blocks) the stream continues from a position tensor:
    its 20 draws take the keys the stream itself gives the 20 draws after that position, from
    two operator calls. No kernel adds a draw's number to the position: each such sum was a
    C++ file of its own (about 0.5 CPU-s of compiling, three per block of a GPT-2)."""
    from fxtrain.random import continued, keyed

    def region(key, position, x):
        with continued(key, position):
            return torch.stack([F.dropout(row, 0.5) for row in x])

    def stream(key, x):  # the stream itself: 4 draws, then the region's 20
        with keyed(key):
            for _ in range(4):
                F.dropout(x[0], 0.5)
            return torch.stack([F.dropout(row, 0.5) for row in x])

    key, x = fx.random.seed_key(3), torch.ones(20, 64)
    with torch._inductor.config.patch(NO_CACHES):
        got, sources = run_and_get_code(torch.compile(region, fullgraph=True), key,
                                        torch.tensor(4), x)
    assert torch.equal(got, stream(key, x))
    code = "\n".join(sources)
    assert code.count("= torch.ops.fxtrain.fold_in_range_after.default(") == 2
    assert "fxtrain.fold_in.default" not in code


def generated_code(model) -> str:
    """The code Inductor generates for ``model``'s compiled step: where inlined hash chains blew
    up. Read, not timed, so that a busy machine cannot fail the test (the seconds are measured in
    benchmarks/compile_time.py)."""
    state = fx.TrainState.create(model, fx.optim.adamw(1e-3))
    step = torch.compile(fx.make_train_step(chained_dropout_loss(0)), fullgraph=True)
    with torch._inductor.config.patch(NO_CACHES):
        _, sources = run_and_get_code(step, state, batch())
    return "\n".join(sources)


def mlp(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32),
                         nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4))


@pytest.mark.slow
def test_dropout_adds_little_to_code_generation():
    plain = generated_code(mlp(0.0))
    torch._dynamo.reset()
    with_dropout = generated_code(mlp(0.1))
    # measured: 1386 lines against 1137 (1.2x); the hash chain inlined into every kernel
    # multiplied the generated code, and its compile time by 10 and more
    assert len(with_dropout.splitlines()) < 1.5 * len(plain.splitlines())
    # each of the two masks is one hash round (0x7FEB352D its multiplier), drawn in the forward
    # and again in the backward; deriving the keys adds none (it runs in fxtrain's operators)
    assert with_dropout.count(str(0x7FEB352D)) <= 2 * 2


def test_python_tensor_methods_compile_and_cache_under_keyed():
    """Tensor methods written in Python reach the keyed mode as functions; passed on as such,
    Dynamo failed on ``unflatten`` and recorded ``split`` as a call AOTAutograd's cache refuses
    (a GPT-2 step then traced its joint graph again in every new process)."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    graphs = []

    def backend(gm, example_inputs):
        del example_inputs
        graphs.append(gm)
        return gm.forward

    def f(key, x):
        with fx.random.keyed(key):
            a, b = x.split(3, dim=1)
            return a.unflatten(1, (3, 1)).sum() + b.norm()

    key, x = fx.random.seed_key(0), torch.randn(4, 6)
    assert torch.allclose(torch.compile(f, fullgraph=True, backend=backend)(key, x), f(key, x))
    with torch._inductor.config.patch(fx_graph_cache=True):
        check_cacheable(graphs[0])  # raises when the cache would be bypassed
