"""The gradient path by strategy (``fxtrain.gradients``), on one process: the choice, and what
``SingleProcess`` does with a scaled loss. Data parallel and sharded runs are tested end to end
in test_distributed.py and test_sharding.py (several processes)."""

import torch

from fxtrain import gradients


def test_the_strategy_follows_the_ranks_and_the_state():
    params, module = {"w": torch.ones(2)}, torch.nn.Linear(2, 1)
    assert type(gradients.chooser(False, True)(params, "func", module)) is \
        gradients.SingleProcess
    assert gradients.chooser(True, False)(params, "func", module) == \
        gradients.DataParallel(mean_buffers=False)
    assert gradients.chooser(True, False)(params, "autograd", module) == \
        gradients.DataParallel(mean_buffers=False, autodiff="autograd")


def test_auto_takes_autograd_only_where_the_model_needs_it():
    module = torch.nn.Linear(2, 1)
    assert gradients.resolved("auto", module) == "func"
    assert gradients.resolved("autograd", module) == "autograd"
    setattr(module, "fxtrain_units", ("0",))  # what fx.shard's units mark on the root
    assert gradients.resolved("auto", module) == "autograd"
    assert gradients.resolved("func", module) == "func"  # named: kept (and refused later)


def test_every_strategy_has_the_same_three_methods():
    for strategy in (gradients.SingleProcess(), gradients.DataParallel(), gradients.Sharded()):
        assert all(callable(getattr(strategy, m)) for m in ("whole", "reduce", "metrics"))


def test_one_process_unscales_and_says_whether_every_gradient_is_finite():
    path = gradients.SingleProcess()
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    assert path.whole(params, None) is params
    grads = {"w": torch.tensor([8.0, 16.0]), "b": torch.tensor([4.0])}
    out = path.reduce(grads, torch.tensor(1.0), {}, {}, params, scale=torch.tensor(4.0),
                      check_finite=True)
    assert torch.equal(out.grads["w"], torch.tensor([2.0, 4.0])) and bool(out.finite)
    assert out.squared is None  # the step computes the norms from the gradients
    grads["b"] = torch.tensor([float("inf")])
    out = path.reduce(grads, torch.tensor(1.0), {}, {}, params, check_finite=True)
    assert not bool(out.finite)
    assert path.reduce(grads, torch.tensor(1.0), {}, {}, params).finite is None  # not asked
