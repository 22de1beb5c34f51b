"""The eager ``fx.optim.rmsprop`` and ``fx.optim.lion`` steps run over lists of leaves
(``fxtrain.optim.fused``): RMSprop in ``torch.optim.RMSprop(foreach=True)``'s ops, so its
bits; both within a few roundings a step of their composable update; a donated step with the
pure one's bits; no value read on the host; the composable update wherever the fused one
cannot run. (Adam's and SGD's: test_fused_adam.py, test_fused_sgd.py.)"""

import pytest
import torch
import torch.nn as nn

import fxtrain as fx
from helpers import fixed_grads, fused_on_fake_tensors, updated_reading_nothing, small_model

pytestmark = pytest.mark.compat  # torch._foreach_* ops, 0-d tensor scalars: every torch in range

EPS32 = torch.finfo(torch.float32).eps
LR, WD, STEPS = 1e-2, 0.1, 40
RMSPROP = {  # fx.optim.rmsprop's arguments (torch.optim.RMSprop's, ``decay`` its ``alpha``)
    "rmsprop": {},
    "rmsprop_momentum": {"momentum": 0.9},
    "rmsprop_centered": {"centered": True},
    "rmsprop_all": {"centered": True, "momentum": 0.9, "weight_decay": WD},
    "rmsprop_l2": {"weight_decay": WD, "decay": 0.9},
}
LION = {
    "lion": {},
    "lion_decay": {"weight_decay": WD},
    "lion_masked": {"weight_decay": WD, "mask": lambda name, p: not name.endswith("bias")},
}
KINDS = {**RMSPROP, **LION}
# the most a step's update moves a parameter, in learning rates: RMSprop's d / sqrt(v) is at
# most 1 / sqrt(1 - decay) (v holds at least (1 - decay) d^2), times 10 with momentum's sum;
# Lion's sign is 1, plus the decay
MOVES = {"rmsprop": 10, "rmsprop_momentum": 100, "rmsprop_centered": 10, "rmsprop_all": 100,
         "rmsprop_l2": 3.2, "lion": 1, "lion_decay": 1.1, "lion_masked": 1.1}
# roundings a step the fused and the composable update may differ by, of the parameter and of
# the update: RMSprop's mean square (its addcmul a fused multiply-add: 2), the root and eps
# (through the division: 2), the division and the rate (addcdiv's value times the quotient,
# the chain's quotient times the rate: 2), momentum's sum and the decay's (2 each); Lion's
# decay and its step (2 each)
ROUNDINGS = {"rmsprop": 6, "rmsprop_momentum": 8, "rmsprop_centered": 8, "rmsprop_all": 12,
             "rmsprop_l2": 8, "lion": 2, "lion_decay": 4, "lion_masked": 4}


def _tx(kind, lr=LR):
    make = fx.optim.rmsprop if kind in RMSPROP else fx.optim.lion
    return make(lr, **KINDS[kind])


_model, _grads = small_model, fixed_grads


def _run(tx, steps=STEPS, donated=False, dtype=torch.float32, every=2, order=None):
    state = fx.TrainState.create(_model(dtype), tx)
    if order is not None:
        state = state.replace(params=order(state.params))
    for i in range(steps):
        grads = _grads(state.params, i)
        kept = {k: g.clone() for k, g in grads.items()}
        state = state.apply_gradients(grads, donated=donated and i % every == 0)
        assert all(torch.equal(grads[k], g) for k, g in kept.items())  # never written into
    return state


def _bound(kind, params, steps):
    biggest = max(p.abs().max().item() for p in params.values())
    return steps * ROUNDINGS[kind] * EPS32 * (biggest + LR * MOVES[kind])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_donated_fused_step_keeps_the_pure_ones_bits(kind, dtype):
    tx = _tx(kind)
    assert tx.fused is not None
    assert fx.tree_digest(_run(tx, dtype=dtype)) == fx.tree_digest(
        _run(tx, donated=True, dtype=dtype))


@pytest.mark.parametrize("kind", list(RMSPROP))
def test_the_fused_rmsprop_step_is_torch_optims_foreach_one(kind):
    """The same ``torch._foreach_*`` ops in the same order as
    ``torch.optim.RMSprop(foreach=True)``, on the same machine: the same bits, float32, 40
    steps, its mean squares, means and momentum buffers too."""
    model = _model()
    named = dict(model.named_parameters())
    args = {("alpha" if k == "decay" else k): v for k, v in RMSPROP[kind].items()}
    opt = torch.optim.RMSprop(named.values(), lr=LR, foreach=True, **args)
    for i in range(STEPS):
        for k, g in _grads(named, i).items():
            named[k].grad = g
        opt.step()
    ours = _run(_tx(kind), donated=True)
    rms = ours.opt_state[int("weight_decay" in args)]
    for k, p in named.items():
        assert torch.equal(ours.params[k], p.detach()), k
        assert torch.equal(rms.nu[k], opt.state[p]["square_avg"]), k
        if args.get("centered"):
            assert torch.equal(rms.mu[k], opt.state[p]["grad_avg"]), k
        if "momentum" in args:
            trace = ours.opt_state[int("weight_decay" in args) + 1].trace
            assert torch.equal(trace[k], opt.state[p]["momentum_buffer"]), k


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_fused_step_agrees_with_the_composable_one_to_the_roundings_of_its_arithmetic(kind):
    """The fused update's sums are fused multiply-adds where the composable one rounds each
    product first (``ROUNDINGS`` counts them a step), of the largest parameter and of the most
    a step moves one (``MOVES``, in learning rates); a learning rate 0.1% off leaves the bound
    (it is no blanket)."""
    tx = _tx(kind)
    fast, composable = _run(tx), _run(tx._replace(fused=None))
    bound = _bound(kind, composable.params, STEPS)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
    planted = _run(_tx(kind, LR * (1 + 1e-3)))
    assert any((planted.params[k] - p).abs().max() > bound
               for k, p in composable.params.items())


def test_lions_mask_decays_only_the_leaves_it_selects():
    """Two runs apart only in the mask: the biases move alike without a decay either way and
    the weights apart."""
    masked, decayed = _run(_tx("lion_masked")), _run(_tx("lion_decay"))
    plain = _run(_tx("lion"))
    for k in plain.params:
        if k.endswith("bias"):
            assert torch.equal(masked.params[k], plain.params[k]), k
        else:
            assert torch.equal(masked.params[k], decayed.params[k]), k
            assert not torch.equal(masked.params[k], plain.params[k]), k


@pytest.mark.parametrize("kind", ["rmsprop_all", "rmsprop", "lion_masked"])
def test_a_scheduled_rate_reads_nothing_on_the_host(kind, monkeypatch):
    """The step count and a scheduled rate stay tensors: no ``item()``, ``float()`` or
    ``bool()`` of a tensor while the update runs (on an accelerator, each would be a sync),
    and the rate reported is the composable update's."""
    schedule = fx.optim.linear_schedule(LR, LR / 10, STEPS)
    make = fx.optim.rmsprop if kind in RMSPROP else fx.optim.lion
    tx = make(schedule, **KINDS[kind])
    state = updated_reading_nothing(fx.TrainState.create(_model(), tx), _grads, 4, monkeypatch)
    composable = _run(tx._replace(fused=None), steps=4)
    for a, b in zip(state.opt_state[-1], composable.opt_state[-1]):  # the count, the rate read
        assert torch.equal(a, b)
    bound = _bound(kind, composable.params, 4)
    for k, p in composable.params.items():
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=bound)


def test_a_scheduled_rate_is_read_as_a_tensor_under_fake_tensors():
    """Under fake tensors a value read on the host (an ``item()``, or a tensor passed where an
    op takes a Python number, which C++ reads) raises: the fused updates read none."""
    schedule = fx.optim.linear_schedule(LR, LR / 10, STEPS)
    for kind in KINDS:
        make = fx.optim.rmsprop if kind in RMSPROP else fx.optim.lion
        tx = make(schedule, **KINDS[kind])
        state = fx.TrainState.create(_model(), tx)
        assert None not in fused_on_fake_tensors(tx, state, _grads(state.params, 0)), kind


def test_a_donated_step_writes_into_the_state_it_was_given():
    state = _run(_tx("rmsprop_all"), steps=1)
    kept = [state.params["0.weight"], state.opt_state[1].nu["0.weight"],
            state.opt_state[1].mu["0.weight"], state.opt_state[2].trace["0.weight"]]
    new = state.apply_gradients(_grads(state.params, 1), donated=True)
    got = [new.params["0.weight"], new.opt_state[1].nu["0.weight"],
           new.opt_state[1].mu["0.weight"], new.opt_state[2].trace["0.weight"]]
    assert all(a is b for a, b in zip(got, kept))


@pytest.mark.parametrize("donated", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("kind", ["rmsprop_all", "lion_masked"])
def test_parameters_ordered_apart_from_the_state_keep_each_leaf_its_own(kind, donated):
    """A state whose parameters were replaced by a dict in another order (a loaded, sorted
    one): the new state keeps its own order, so a donated state is written into name by name,
    and each parameter moves as the composable update moves it."""
    reverse = lambda params: dict(reversed(list(params.items())))  # noqa: E731
    tx = _tx(kind)
    fast, composable = (_run(t, steps=3, donated=donated, every=1, order=reverse)
                        for t in (tx, tx._replace(fused=None)))
    bound = _bound(kind, composable.params, 3)
    for a, b in zip(torch.utils._pytree.tree_leaves(fast.opt_state),
                    torch.utils._pytree.tree_leaves(composable.opt_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=bound)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)


def test_where_the_fused_step_cannot_run_the_composable_one_does():
    # no fused update where a hyperparameter other than the rate is a tensor
    assert fx.optim.rmsprop(LR, decay=torch.tensor(0.9)).fused is None
    assert fx.optim.rmsprop(LR, momentum=torch.tensor(0.9)).fused is None
    assert fx.optim.lion(LR, b1=torch.tensor(0.9)).fused is None
    assert fx.optim.lion(LR, weight_decay=torch.tensor(0.1)).fused is None
    for kind in ("rmsprop_l2", "lion_decay"):
        tx = _tx(kind)
        state = fx.TrainState.create(_model(), tx)
        grads = _grads(state.params, 0)
        composable = state.replace(tx=tx._replace(fused=None))
        if kind in RMSPROP:  # (Lion's composable lerp refuses them: its moment's dtype)
            # gradients of another dtype than their parameters: the composable update's
            # promotion
            wide = {k: g.double() for k, g in grads.items()}
            assert fx.tree_digest(state.apply_gradients(wide)) == fx.tree_digest(
                composable.apply_gradients(wide).replace(tx=tx))
        # tied parameters (one tensor under two names), and the same apart: only the first
        # is refused
        shared, other = torch.ones(3), torch.ones(3)
        for params, refused in (({"a": shared, "b": shared}, True),
                                ({"a": shared, "b": other}, False)):
            got = tx.fused({k: torch.ones(3) for k in params}, tx.init(params), params, False)
            assert (got is None) == refused, (kind, refused)
        # the state of another chain (momentum's trace where this one has none, and back)
        other_chain = _tx("rmsprop_momentum" if kind in RMSPROP else "lion")
        assert tx.fused(grads, other_chain.init(state.params), state.params, False) is None
        # an update being differentiated: the composable one, with its graph
        live = {k: g.clone().requires_grad_() for k, g in grads.items()}
        new = state.apply_gradients(live)
        assert new.params["0.weight"].requires_grad
        assert fx.tree_digest(new) == fx.tree_digest(
            composable.apply_gradients(live).replace(tx=tx))


def test_lions_mask_of_names_stays_fused_on_a_model_with_tied_weights():
    """A mask of names (transformers' ``get_decay_parameter_names``) on a model whose head is
    its embedding: ``TrainState.create`` rebinds the mask to the tied names, and the chain it
    gives keeps its fused update, which decays as the composable one does."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=True)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    torch.manual_seed(0)
    tx = fx.optim.lion(LR, weight_decay=WD, mask=["head.weight"])
    state = fx.TrainState.create(Tied(), tx)
    assert state.tx.fused is not None
    composable = state.replace(tx=state.tx._replace(fused=None))
    for i in range(3):
        grads = _grads(state.params, i)
        state, composable = (s.apply_gradients(grads) for s in (state, composable))
    bound = _bound("lion_decay", composable.params, 3)
    for k, p in composable.params.items():
        torch.testing.assert_close(state.params[k], p, rtol=0, atol=bound)
