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
