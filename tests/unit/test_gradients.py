"""The gradient path by layout (``fxtrain.distributed``'s ``strategy``, ``fxtrain.step._autodiff``'
``resolved``), on one process: the lookup, and what ``SingleProcess`` does with a scaled loss.
Data parallel and sharded runs are tested end to end in test_distributed.py and
test_sharding.py (several processes)."""

import dataclasses

import torch

from fxtrain import distributed
from fxtrain.step import _autodiff as gradients
from fxtrain.distributed import Layout


class TwoRanks:
    """A stand-in mesh of 2 ranks (what a lookup reads of a DeviceMesh)."""
    ndim = 1

    def size(self, dim=None):
        return 2

    def get_coordinate(self):
        return [1]


def test_the_strategy_follows_the_ranks_and_the_layout(monkeypatch):
    one = Layout()
    assert type(distributed.strategy(one, "func", False, True)) is distributed.SingleProcess
    monkeypatch.setattr(distributed._ranks, "world_size", lambda: 2)  # two data replicas
    assert distributed.strategy(one, "func", True, False) == \
        distributed.DataParallel(mean_buffers=False)
    assert distributed.strategy(one, "autograd", True, False) == \
        distributed.DataParallel(mean_buffers=False, autodiff="autograd")
    assert type(distributed.strategy(one, "func", False, True)) is distributed.SingleProcess
    sharded = Layout(mesh=TwoRanks(), roles=distributed.Roles(shard=0))
    assert distributed.strategy(sharded, "func", True, True) == \
        distributed.Sharded(sharded, parallel=True)
    split = Layout(mesh=TwoRanks(), roles=distributed.Roles(tp=0), planned=("0",))
    assert type(distributed.strategy(split, "autograd", True, True)) is \
        distributed.TensorParallel  # one batch for the group: no data parallel beside it
    assert (split.data_world_size(), split.data_rank(), split.tensor_parallel_size()) == \
        (1, 0, 2)
    assert (sharded.data_world_size(), sharded.data_rank()) == (2, 1)


def test_auto_takes_autograd_only_where_the_layout_needs_it():
    layout = Layout()
    assert gradients.resolved("auto", layout) == "func"
    assert gradients.resolved("autograd", layout) == "autograd"
    units = dataclasses.replace(layout, mesh=TwoRanks(), roles=distributed.Roles(shard=0),
                                units=("0",))  # what fx.shard's units give a state
    assert gradients.resolved("auto", units) == "autograd"
    assert gradients.resolved("func", units) == "func"  # named: kept (and refused later)
    assert gradients.resolved("auto", Layout(checkpointing=True)) == "autograd"


def test_every_strategy_has_the_same_three_methods():
    for strategy in (distributed.SingleProcess(), distributed.DataParallel(),
                     distributed.Sharded(Layout())):
        assert all(callable(getattr(strategy, m)) for m in ("whole", "reduce", "metrics"))


def test_one_process_unscales_and_says_whether_every_gradient_is_finite():
    path = distributed.SingleProcess()
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    assert path.whole(params) is params
    grads = {"w": torch.tensor([8.0, 16.0]), "b": torch.tensor([4.0])}
    out = path.reduce(grads, torch.tensor(1.0), {}, {}, params, scale=torch.tensor(4.0),
                      check_finite=True)
    assert torch.equal(out.grads["w"], torch.tensor([2.0, 4.0])) and bool(out.finite)
    assert out.squared is None  # the step computes the norms from the gradients
    grads["b"] = torch.tensor([float("inf")])
    out = path.reduce(grads, torch.tensor(1.0), {}, {}, params, check_finite=True)
    assert not bool(out.finite)
    assert path.reduce(grads, torch.tensor(1.0), {}, {}, params).finite is None  # not asked
