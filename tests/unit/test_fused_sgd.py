"""An eager ``fx.optim.sgd`` step runs over lists of leaves (``fxtrain.optim.fused.fused_sgd``):
``torch.optim.SGD(foreach=True)``'s ops, so its bits, donated or not; within a rounding a step
of the composable update, whose products are rounded before they are added; no value read on
the host; the composable update wherever the fused one cannot run."""

import pytest
import torch
import torch.nn as nn

import fxtrain as fx
from helpers import fixed_grads, fused_on_fake_tensors, updated_reading_nothing, small_model

pytestmark = pytest.mark.compat  # torch._foreach_* ops, 0-d tensor scalars: every torch in range

EPS32 = torch.finfo(torch.float32).eps
LR, WD, STEPS = 1e-2, 0.1, 40
KINDS = {  # fx.optim.sgd's and torch.optim.SGD's arguments
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "nesterov_l2": {"momentum": 0.9, "nesterov": True, "weight_decay": WD},
    "l2": {"weight_decay": WD},
}


_model, _grads = small_model, fixed_grads


def _run(tx, steps=STEPS, donated=False, dtype=torch.float32, every=2):
    state = fx.TrainState.create(_model(dtype), tx)
    for i in range(steps):
        grads = _grads(state.params, i)
        kept = {k: g.clone() for k, g in grads.items()}
        state = state.apply_gradients(grads, donated=donated and i % every == 0)
        assert all(torch.equal(grads[k], g) for k, g in kept.items())  # never written into
    return state


def _bound(params, steps):
    """What the fused and the composable update may differ by after ``steps`` (the test of
    their arithmetic says why)."""
    biggest = max(p.abs().max().item() for p in params.values())
    return steps * 6 * EPS32 * (biggest + LR * 10 * 10.0 ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_donated_fused_sgd_step_keeps_the_pure_ones_bits(kind, dtype):
    tx = fx.optim.sgd(LR, **KINDS[kind])
    assert tx.fused is not None
    assert fx.tree_digest(_run(tx, dtype=dtype)) == fx.tree_digest(
        _run(tx, donated=True, dtype=dtype))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_fused_sgd_step_is_torch_optims_foreach_one(kind):
    """The same ``torch._foreach_*`` ops in the same order as ``torch.optim.SGD(foreach=True)``
    (dampening 0), on the same machine: the same bits, float32, 40 steps."""
    model = _model()
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(named.values(), lr=LR, foreach=True, **KINDS[kind])
    for i in range(STEPS):
        for k, g in _grads(named, i).items():
            named[k].grad = g
        opt.step()
    ours = _run(fx.optim.sgd(LR, **KINDS[kind]))
    for k, p in named.items():
        assert torch.equal(ours.params[k], p.detach()), k
        if "momentum" in KINDS[kind]:
            assert torch.equal(ours.opt_state[int("weight_decay" in KINDS[kind])].trace[k],
                               opt.state[p]["momentum_buffer"]), k


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_fused_sgd_step_agrees_with_the_composable_one_to_the_roundings_of_its_arithmetic(
        kind):
    """torch's ``a + x b`` is one ``add(alpha=x)``, a fused multiply-add where the CPU's vector
    unit has one; the composable update rounds ``x b`` first. A rounding of the parameter and
    one of the update, a step, for each of the three such sums (the decay's, Nesterov's, the
    parameter's), the update at most ``lr`` times the largest gradient's scale (10) summed over
    momentum's 1 + 0.9 + 0.81 ... = 10 steps: 2 roundings of each, three times, a step."""
    tx = fx.optim.sgd(LR, **KINDS[kind])
    fast, composable = _run(tx), _run(tx._replace(fused=None))
    bound = _bound(composable.params, STEPS)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
    planted = _run(fx.optim.sgd(LR * (1 + 1e-3), **KINDS[kind]))  # the bound is no blanket
    assert any((planted.params[k] - p).abs().max() > bound
               for k, p in composable.params.items())


def test_a_scheduled_rate_reads_nothing_on_the_host_and_is_reported_as_the_composable_one(
        monkeypatch):
    """The step count and a scheduled rate stay tensors: no ``item()``, ``float()`` or
    ``bool()`` of a tensor while the update runs (on an accelerator, each would be a sync)."""
    schedule = fx.optim.linear_schedule(LR, LR / 10, STEPS)
    tx = fx.optim.sgd(schedule, momentum=0.9, weight_decay=WD)
    state = updated_reading_nothing(fx.TrainState.create(_model(), tx), _grads, 4, monkeypatch)
    composable = _run(tx._replace(fused=None), steps=4)
    for a, b in zip(state.opt_state[2], composable.opt_state[2]):  # the count, the rate read
        assert torch.equal(a, b)
    bound = _bound(composable.params, 4)
    for k, p in composable.params.items():
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=bound)


def test_a_donated_step_writes_into_the_state_it_was_given():
    state = _run(fx.optim.sgd(LR, momentum=0.9), steps=1)
    trace, weight = state.opt_state[0].trace["0.weight"], state.params["0.weight"]
    new = state.apply_gradients(_grads(state.params, 1), donated=True)
    assert new.opt_state[0].trace["0.weight"] is trace and new.params["0.weight"] is weight


def test_where_the_fused_sgd_cannot_run_the_composable_one_does():
    # no fused update where the momentum or the decay is a tensor (inject_hyperparams)
    assert fx.optim.sgd(LR, momentum=torch.tensor(0.9)).fused is None
    assert fx.optim.sgd(LR, weight_decay=torch.tensor(0.1)).fused is None
    tx = fx.optim.sgd(LR, momentum=0.9)
    state = fx.TrainState.create(_model(), tx)
    grads = _grads(state.params, 0)
    composable = state.replace(tx=tx._replace(fused=None))
    # gradients of another dtype than their parameters: the composable update's promotion
    wide = {k: g.double() for k, g in grads.items()}
    assert fx.tree_digest(state.apply_gradients(wide)) == fx.tree_digest(
        composable.apply_gradients(wide).replace(tx=tx))  # both run the composable update
    # tied parameters (one tensor under two names): the composable update
    shared = torch.ones(3)
    tied = fx.TrainState.create(nn.Linear(3, 3), tx).replace(params={"a": shared, "b": shared})
    assert tx.fused({"a": shared, "b": shared}, tied.opt_state, tied.params, False) is None
    # an update being differentiated: the composable one, with its graph
    live = {k: g.clone().requires_grad_() for k, g in grads.items()}
    new = state.apply_gradients(live)
    assert new.params["0.weight"].requires_grad
    assert fx.tree_digest(new) == fx.tree_digest(composable.apply_gradients(live).replace(tx=tx))


def test_a_scheduled_rate_is_read_as_a_tensor_under_fake_tensors():
    """Under fake tensors a value read on the host (an ``item()``, or a tensor passed where
    an op takes a Python number, which C++ reads) raises: the fused update reads none."""
    schedule = fx.optim.linear_schedule(LR, LR / 10, STEPS)
    for kind in KINDS:
        tx = fx.optim.sgd(schedule, **KINDS[kind])
        state = fx.TrainState.create(_model(), tx)
        assert None not in fused_on_fake_tensors(tx, state, _grads(state.params, 0)), kind


@pytest.mark.parametrize("donated", [False, True], ids=["pure", "donated"])
def test_parameters_ordered_apart_from_the_trace_keep_each_trace_its_own(donated):
    """A state whose parameters were replaced by a dict in another order (a loaded, sorted
    one): the new trace keeps its own order, so a donated state is written into name by name,
    and each parameter moves as the composable update moves it."""
    tx = fx.optim.sgd(LR, momentum=0.9)
    states = []
    for t in (tx, tx._replace(fused=None)):
        state = fx.TrainState.create(_model(), t)
        state = state.replace(params=dict(reversed(list(state.params.items()))))
        for i in range(3):
            state = state.apply_gradients(_grads(state.params, i), donated=donated)
        states.append(state)
    fast, composable = states
    assert list(fast.opt_state[0].trace) == list(composable.opt_state[0].trace)
    bound = _bound(composable.params, 3)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
        torch.testing.assert_close(fast.opt_state[0].trace[k], composable.opt_state[0].trace[k],
                                   rtol=0, atol=bound)
