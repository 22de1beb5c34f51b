"""A unit's eager gather (``fxtrain.distributed._unit_gather``: one all-gather of all its shards
into one buffer) on a one-rank group, where a sharded step has an unsharded one's bits."""

import pytest
import torch

import fxtrain as fx


class Mixed(torch.nn.Module):
    """A bfloat16 linear layer and a float32 norm in one module (as a model with modules kept
    in float32 loads)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(8)
        with torch.no_grad():  # weights that bfloat16 cannot hold exactly
            self.norm.weight.add_(torch.randn(8) * 1e-3)

    def forward(self, x):
        return self.norm(self.linear(x.to(torch.bfloat16)).float())


def _model():
    return torch.nn.Sequential(Mixed(), torch.nn.Linear(8, 2))


def test_a_unit_of_parameters_of_two_dtypes_computes_each_in_its_own(one_rank):
    """Without a param_dtype, each parameter is gathered in its own dtype: before, the unit's
    one buffer took its first parameter's (bfloat16), and the float32 norm's weights were
    rounded to bfloat16 in the forward and its gradients in the backward."""
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    plain = fx.TrainState.create(_model(), fx.optim.adamw(1e-2))
    sharded = fx.shard(fx.TrainState.create(_model(), fx.optim.adamw(1e-2)), units=["0"])
    for _ in range(3):
        plain, plain_metrics = step(plain, batch)
        sharded, metrics = step(sharded, batch)
        assert torch.equal(metrics["loss"], plain_metrics["loss"])
    whole = fx.sharding.gathered(sharded.params)
    assert {k: p.dtype for k, p in whole.items()} == {k: p.dtype for k, p in plain.params.items()}
    assert all(torch.equal(whole[k], plain.params[k]) for k in plain.params)


TOKENS, WIDTH, DEPTH = 8192, 32, 4
ACTIVATION = TOKENS * WIDTH * 4  # one block's input (or any one output of its ops), float32


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, h):
        return h + self.outer(torch.tanh(self.inner(h)))


class _Checkpointed(torch.nn.Module):
    """Blocks each run in torch.utils.checkpoint (non-reentrant) by the model's own forward, as
    transformers' gradient checkpointing runs its decoder layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(DEPTH))

    def forward(self, h):
        from torch.utils.checkpoint import checkpoint
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False)
        return h


def _peak(state, step, batch):
    """The bytes a step holds at its peak beyond the state (the second step: the first made
    the optimizer's moments), by benchmarks/simulate.py's Tracker."""
    from helpers import imported
    simulate = imported("simulate")
    state, _ = step(state, batch)
    held = simulate._storages((state.params, state.opt_state, state.buffers, state.rng,
                               state.step))
    with simulate.Tracker(held) as tracker:
        step(state, batch)
    return tracker.peak - simulate._nbytes(held)


def test_units_in_the_models_own_checkpointed_blocks_keep_what_an_unsharded_model_does(one_rank):
    """A unit whose block the model checkpoints itself (transformers' gradient checkpointing)
    gathers without saved-tensor hooks of its own: the block's region keeps its input only,
    and its rerun in the backward gathers again. Through the unit's own checkpointed region,
    nested in the block's, the unit's selective checkpoint kept every output of every block's
    forward (its inner and outer products, the tanh, the sum: 4 activations a block) until its
    backward: 21.0 MB here against the unsharded model's 8.4 (2 gloo ranks, a 2-layer Llama of
    width 128, 2048 tokens: 75.0 MB of activations against 25.5; 47.6 unchecked). Seen: 8.4 MB
    sharded and unsharded."""
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean(),
                              autodiff="autograd")
    batch = torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(1))
    plain = _peak(fx.TrainState.create(_Checkpointed(), fx.optim.adamw(1e-2)), step, batch)
    sharded = fx.shard(fx.TrainState.create(_Checkpointed(), fx.optim.adamw(1e-2)),
                       units="auto")
    assert len(sharded.layout.units) == DEPTH
    weights = sum(p.numel() * 4 for p in _Block().parameters())  # one block's, gathered
    peak = _peak(sharded, step, batch)
    # each block's input, one block's four outputs in its rerun and backward, the loss's square
    # and its gradient, and a few more of a block's size for the backward's temporaries
    assert plain <= (DEPTH + 8) * ACTIVATION, plain
    assert peak <= plain + 2 * weights, (peak, plain)
