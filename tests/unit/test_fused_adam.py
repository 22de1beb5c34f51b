"""An eager ``fx.optim.adamw`` / ``adam`` step runs ``torch.optim``'s foreach update
(``fxtrain.optim.fused``): within the roundings of the arithmetic of ``torch.optim``'s and of
the composable update, the same bits donated or not, no value read on the host, and the
composable update wherever the fused one cannot run."""

import torch
import torch.utils._pytree as pytree

import fxtrain as fx
from helpers import fixed_grads, updated_reading_nothing, small_model
import pytest

pytestmark = pytest.mark.compat  # torch._foreach_* ops, 0-d tensor scalars: every torch in range

EPS32 = torch.finfo(torch.float32).eps
LR, WD, STEPS = 1e-2, 0.1, 40


_model, _grads = small_model, fixed_grads


def _run(tx, steps=STEPS, donated=False, dtype=torch.float32):
    state = fx.TrainState.create(_model(dtype), tx)
    for i in range(steps):
        state = state.apply_gradients(_grads(state.params, i), donated=donated and i % 2 == 0)
    return state


def _torch_run(kind, steps=STEPS, dtype=torch.float32):
    model = _model(dtype)
    named = dict(model.named_parameters())
    if kind == "adamw_masked":  # weight decay for the matrices alone, as two groups
        groups = [{"params": [p for p in named.values() if p.ndim >= 2]},
                  {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
    else:
        groups = list(named.values())
    opt = {"adamw": torch.optim.AdamW, "adamw_masked": torch.optim.AdamW,
           "adam": torch.optim.Adam, "adam_l2": torch.optim.Adam}[kind](
        groups, lr=LR, weight_decay=0.0 if kind == "adam" else WD, foreach=True)
    for i in range(steps):
        for k, g in _grads(named, i).items():
            named[k].grad = g
        opt.step()
    return named, opt


TXS = {"adamw": lambda: fx.optim.adamw(LR, weight_decay=WD),
       "adamw_masked": lambda: fx.optim.adamw(LR, weight_decay=WD,
                                              mask=lambda name, p: p.ndim >= 2),
       "adam": lambda: fx.optim.adam(LR),
       "adam_l2": lambda: fx.optim.adam(LR, weight_decay=WD)}


def _bound(params, steps, eps=EPS32):
    """What two arithmetics of Adam may differ by after ``steps``: each step rounds a
    parameter a few times (its decay, the update's add) and the update itself a few more (the
    order of the bias correction and the step size, ``addcmul``'s fused multiply-add in the
    second moment), and Adam's direction is at most (1 - b1) / sqrt(1 - b2) < 4 in size:
    eight roundings of ``eps`` a step, of the largest parameter and of four times the rate.
    The gradients do not depend on the parameters, so a difference does not grow through the
    loss."""
    biggest = max(p.abs().max().item() for p in params.values())
    return steps * 8 * eps * (biggest + 4 * LR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", list(TXS))
def test_an_eager_adam_step_agrees_with_torch_optims_foreach_one(kind, dtype):
    pure, donated = _run(TXS[kind](), dtype=dtype), _run(TXS[kind](), donated=True, dtype=dtype)
    assert fx.tree_digest(pure) == fx.tree_digest(donated)  # the same ops, in place or not
    named, opt = _torch_run(kind, dtype=dtype)
    adam = next(s for s in pure.opt_state if isinstance(s, fx.optim.ScaleByAdamState))
    assert int(adam.count) == STEPS and int(pure.step) == STEPS
    eps = torch.finfo(dtype).eps
    bound = _bound(named, STEPS, eps)
    for k, p in named.items():
        torch.testing.assert_close(pure.params[k], p.detach(), rtol=0, atol=bound)
        # the moments: the same ops on gradients and, for Adam's L2, on parameters this close
        torch.testing.assert_close(adam.mu[k], opt.state[p]["exp_avg"], rtol=4 * STEPS * eps,
                                   atol=bound)
        torch.testing.assert_close(adam.nu[k], opt.state[p]["exp_avg_sq"],
                                   rtol=4 * STEPS * eps, atol=bound ** 2)


def test_a_donated_bf16_step_keeps_the_pure_ones_bits_whatever_b2():
    """``torch._foreach_mul_`` rounds a Python scalar to bfloat16 before it multiplies (the
    CPU's kernel, torch 2.11 to 2.15), where ``_foreach_mul`` does not: b2 = 0.95 (0.9492 in
    bfloat16) made a donated step's second moment another than the pure step's."""
    tx = lambda: fx.optim.adamw(LR, b1=0.8, b2=0.95, weight_decay=WD)  # noqa: E731
    pure = _run(tx(), dtype=torch.bfloat16)
    assert fx.tree_digest(pure) == fx.tree_digest(_run(tx(), donated=True, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", list(TXS))
def test_the_fused_update_agrees_with_the_composable_one_to_the_roundings_of_its_arithmetic(
        kind):
    tx = TXS[kind]()
    fast, composable = _run(tx), _run(tx._replace(fused=None))
    bound = _bound(composable.params, STEPS)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
    assert pytree.tree_structure(fast.opt_state) == pytree.tree_structure(composable.opt_state)


def test_a_scheduled_learning_rate_is_read_and_reported_as_the_composable_update_does():
    schedule = fx.optim.warmup_cosine_decay_schedule(0.0, LR, 5, STEPS)  # from lr 0: no NaN
    tx = fx.optim.adamw(schedule, weight_decay=WD)
    fast, composable = _run(tx), _run(tx._replace(fused=None))
    assert torch.equal(fast.opt_state[2].learning_rate, composable.opt_state[2].learning_rate)
    assert torch.equal(fast.opt_state[2].count, composable.opt_state[2].count)
    bound = _bound(composable.params, STEPS)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
    still = _run(fx.optim.adamw(0.0, weight_decay=WD), steps=3)  # a zero rate moves nothing
    assert fx.tree_digest(still.params) == fx.tree_digest(
        fx.TrainState.create(_model(), fx.optim.adamw(0.0)).params)


def test_the_update_reads_no_value_on_the_host(monkeypatch):
    """The step count and a scheduled rate stay tensors: no ``item()``, ``float()`` or
    ``bool()`` of a tensor while the update runs (on an accelerator, each would be a sync)."""
    schedule = fx.optim.linear_schedule(LR, LR / 10, STEPS)
    state = fx.TrainState.create(_model(), fx.optim.adamw(schedule, weight_decay=WD))
    state = updated_reading_nothing(state, _grads, 4, monkeypatch)
    assert int(state.opt_state[0].count) == 4


def test_where_the_fused_update_cannot_run_the_composable_one_does():
    # no fused update: Nesterov, or a hyperparameter given as a tensor
    assert fx.optim.adam(LR, nesterov=True).fused is None
    assert fx.optim.adamw(LR, b1=torch.tensor(0.9)).fused is None
    tx = fx.optim.adamw(LR, weight_decay=WD)
    composable = tx._replace(fused=None)
    state = fx.TrainState.create(_model(), tx)
    grads = _grads(state.params, 0)

    def same(a, b):
        assert fx.tree_digest(a) == fx.tree_digest(b)

    # gradients of another dtype than their parameters: the composable update's error
    wide = {k: g.double() for k, g in grads.items()}
    for s in (state, state.replace(tx=composable)):
        with pytest.raises(RuntimeError, match="expected dtype float"):
            s.apply_gradients(wide)
    # an update being differentiated: the composable one, with its graph
    live = {k: g.clone().requires_grad_() for k, g in grads.items()}
    new = state.apply_gradients(live)
    assert new.params["0.weight"].requires_grad
    same(new, state.replace(tx=composable).apply_gradients(live))
    # compiled: the composable update (Inductor fuses it by itself)
    step = torch.compile(lambda s, g: s.apply_gradients(g), fullgraph=True, backend="eager")
    same(step(state, grads), state.replace(tx=composable).apply_gradients(grads))


def test_the_fused_update_survives_tied_names_in_a_mask():
    tx = fx.optim.adamw(LR, weight_decay=WD, mask=["lm_head.weight"])
    tied = fx.optim.masks.with_tied(tx, (("wte.weight", "lm_head.weight"),))
    params = {"wte.weight": torch.ones(3), "ln.bias": torch.ones(3)}
    grads = {k: torch.zeros(3) for k in params}
    assert tied.fused is not None
    out, _ = tied.fused(grads, tied.init(params), params, False)
    assert torch.equal(out["wte.weight"], torch.full((3,), 1 - LR * WD))  # decays, via its tie
    assert torch.equal(out["ln.bias"], torch.ones(3))  # does not


@pytest.mark.parametrize("donated", [False, True], ids=["pure", "donated"])
def test_parameters_ordered_apart_from_the_moments_keep_each_moment_its_own(donated):
    """A state whose parameters were replaced by a dict in another order (a loaded, sorted
    one): the new moments keep their own order, so a donated state is written into name by
    name, and the step equals the composable update's."""
    tx = fx.optim.adamw(LR, weight_decay=WD)
    states = []
    for t in (tx, tx._replace(fused=None)):
        state = fx.TrainState.create(_model(), t)
        state = state.replace(params=dict(reversed(list(state.params.items()))))
        for i in range(3):
            state = state.apply_gradients(_grads(state.params, i), donated=donated)
        states.append(state)
    fast, composable = states
    assert list(fast.opt_state[0].mu) == list(composable.opt_state[0].mu)
    bound = _bound(composable.params, 3)
    for k, p in composable.params.items():
        torch.testing.assert_close(fast.params[k], p, rtol=0, atol=bound)
        torch.testing.assert_close(fast.opt_state[0].mu[k], composable.opt_state[0].mu[k],
                                   rtol=0, atol=0)
