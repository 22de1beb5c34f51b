import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import fxtrain as fx
from fxtrain import optim

from helpers import extra, graph_count


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 3, generator=g, dtype=dtype), "b": torch.randn(3, generator=g, dtype=dtype)}
    data = [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype))
            for _ in range(4)]
    return params, data


def _loss(params, x, y):
    return ((x @ params["w"] + params["b"] - y) ** 2).mean()


def _run_fx(tx, params, data, steps):
    state = tx.init(params)
    for i in range(steps):
        x, y = data[i % len(data)]
        grads = torch.func.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_torch(make_opt, params, data, steps):
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make_opt(list(tensors.values()))
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        _loss(tensors, x, y).backward()
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


PARITY = {
    "sgd": (lambda: optim.sgd(0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    "sgd_momentum": (lambda: optim.sgd(0.05, momentum=0.9, weight_decay=1e-3),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd_nesterov": (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam_l2": (lambda: optim.adam(1e-2, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1)),
    "adamw": (lambda: optim.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "rmsprop": (lambda: optim.rmsprop(1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    "rmsprop_centered_momentum": (lambda: optim.rmsprop(1e-2, momentum=0.5, centered=True),
                                  lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True)),
}


def parity_tol(dtype, steps, params):
    """How far two correct implementations may drift in ``steps`` steps: a gradient here sums
    16 x 5 products (about sqrt(80) ~ 9 eps relative in another order), a step moves a parameter
    by less than 1, and adding it rounds the parameter by eps |p|: under 16 eps max(1, |p|) a
    step. A doubled gradient or a misplaced weight decay is off by ~1e-2 after one step."""
    scale = max(1.0, *(float(p.abs().max()) for p in params.values()))
    return steps * 16 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("name", PARITY)
@pytest.mark.parametrize("dtype,steps", [(torch.float32, 5), (torch.float64, 50)])
def test_parity_with_torch_optim(name, dtype, steps):
    ours, theirs = PARITY[name]
    params, data = _problem(dtype)
    a = _run_fx(ours(), params, data, steps)
    b = _run_torch(theirs, params, data, steps)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    tol = parity_tol(dtype, steps, b)
    assert diff <= tol, f"{name}: max |dparam| = {diff:.3g} after {steps} steps (bound {tol:.3g})"


def test_lion_equals_optax_lion():
    """Lion has no torch.optim counterpart; optax's is the reference: float32 over a sequence of
    gradients (momentum interpolation, sign, decoupled weight decay). XLA and torch may round
    (or fuse into an FMA) ``p - lr (sign + wd p)`` differently: a few eps of |p| a step; a wrong
    sign is 2 lr = 6e-2 off after one step."""
    optax, jnp = extra("optax"), extra("jax.numpy")
    params, _ = _problem(torch.float32)
    g = torch.Generator().manual_seed(1)
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(20)]
    tx, ref = optim.lion(3e-2, b1=0.8, b2=0.95, weight_decay=0.1), optax.lion(
        3e-2, b1=0.8, b2=0.95, weight_decay=0.1)
    ours, state = params, tx.init(params)
    theirs = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
    ref_state = ref.init(theirs)
    for grad in grads:
        updates, state = tx.update(grad, state, ours)
        ours = optim.apply_updates(ours, updates)
        ref_updates, ref_state = ref.update({k: jnp.asarray(v.numpy()) for k, v in grad.items()},
                                            ref_state, theirs)
        theirs = optax.apply_updates(theirs, ref_updates)
    tol = 20 * 4 * torch.finfo(torch.float32).eps * max(1.0, *(float(p.abs().max())
                                                               for p in ours.values()))
    for k in params:
        torch.testing.assert_close(ours[k], torch.from_numpy(np.asarray(theirs[k]).copy()),
                                   atol=tol, rtol=0, msg=k)


def test_parity_with_schedule_and_clipping():
    params, data = _problem(torch.float64)
    sched = optim.linear_schedule(1e-2, 1e-3, 20)
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(sched, weight_decay=0.01))
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tensors.values()), lr=1e-2, weight_decay=0.01)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1e-2 + min(t, 20) / 20 * (1e-3 - 1e-2)) / 1e-2)
    ours = _run_fx(tx, params, data, 30)
    for i in range(30):
        x, y = data[i % len(data)]
        opt.zero_grad()
        _loss(tensors, x, y).backward()
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 0.5)
        opt.step()
        lrs.step()
    diff = max(float((ours[k] - tensors[k].detach()).abs().max()) for k in ours)
    assert diff <= 1e-6  # torch's clip adds 1e-6 to the norm; ours does not


REGISTRY = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9),
    "adam": lambda: optim.adam(0.05),
    "adamw": lambda: optim.adamw(0.05, weight_decay=1e-4),
    "lion": lambda: optim.lion(0.01),
    "rmsprop": lambda: optim.rmsprop(0.01),
    "injected_adamw": lambda: optim.inject_hyperparams(optim.adamw)(learning_rate=0.05, weight_decay=1e-4),
    "scheduled": lambda: optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 0.05, 10, 300)),
    "clipped": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.05)),
    "accumulated": lambda: optim.multi_steps(optim.adam(0.05), 2),
    "finite_only": lambda: optim.apply_if_finite(optim.adam(0.05)),
}


def _least_squares(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    w_true = torch.randn(4, 1, generator=g, dtype=dtype)
    return x, x @ w_true


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_converges_and_keeps_dtype_and_structure(name):
    x, y = _least_squares()
    tx = REGISTRY[name]()
    params = {"w": torch.zeros(4, 1)}
    state = tx.init(params)
    spec = pytree.tree_structure(state)
    loss = lambda p: ((x @ p["w"] - y) ** 2).mean()  # noqa: E731
    start = float(loss(params))
    for _ in range(300):
        updates, state = tx.update(torch.func.grad(loss)(params), state, params)
        params = optim.apply_updates(params, updates)
        assert pytree.tree_structure(state) == spec
    assert params["w"].dtype == torch.float32
    assert float(loss(params)) < 1e-2 * start, name


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_compiles_without_recompiling(name):
    x, y = _least_squares()
    tx = REGISTRY[name]()

    def step(params, state):
        grads = torch.func.grad(lambda p: ((x @ p["w"] - y) ** 2).mean())(params)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    params = {"w": torch.zeros(4, 1)}
    state = tx.init(params)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    params, state = compiled(params, state)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            params, state = compiled(params, state)
    assert graph_count() == 1


def test_bf16_params_keep_dtype():
    tx = optim.adamw(1e-2)
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    updates, _ = tx.update({"w": torch.ones(3, dtype=torch.bfloat16)}, tx.init(params), params)
    assert optim.apply_updates(params, updates)["w"].dtype == torch.bfloat16


def test_schedules_values():
    t = lambda n: torch.tensor(n)  # noqa: E731
    assert float(optim.constant_schedule(0.3)(t(7))) == pytest.approx(0.3)
    lin = optim.linear_schedule(1.0, 0.0, 10, transition_begin=5)
    assert [float(lin(t(n))) for n in (0, 5, 10, 15, 99)] == pytest.approx([1, 1, 0.5, 0, 0])
    cos = optim.cosine_decay_schedule(2.0, 10, alpha=0.1)
    assert [float(cos(t(n))) for n in (0, 5, 10, 20)] == pytest.approx([2.0, 1.1, 0.2, 0.2])
    wc = optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=0.1)
    assert [float(wc(t(n))) for n in (0, 5, 10, 60, 110, 500)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])
    ex = optim.exponential_decay(1.0, 10, 0.5, end_value=0.3)
    assert [float(ex(t(n))) for n in (0, 10, 100)] == pytest.approx([1.0, 0.5, 0.3])
    joined = optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(2.0, 0.0, 4)], [3])
    assert [float(joined(t(n))) for n in (0, 2, 3, 5, 7)] == pytest.approx([1, 1, 2, 1, 0])
    with pytest.raises(ValueError, match="boundaries"):
        optim.join_schedules([optim.constant_schedule(1.0)], [3])


def test_inject_hyperparams_changes_lr_without_recompile():
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    params = {"w": torch.ones(2)}
    grads = {"w": torch.ones(2)}
    state = tx.init(params)
    update = torch.compile(tx.update, fullgraph=True, backend="eager")
    u1, state = update(grads, state, params)
    state = state._replace(hyperparams={"learning_rate": torch.tensor(0.5)})
    with torch._dynamo.config.patch(error_on_recompile=True):
        u2, state = update(grads, state, params)
    assert torch.allclose(u1["w"], torch.full((2,), -0.1)) and torch.allclose(u2["w"], torch.full((2,), -0.5))
    assert float(optim.learning_rate(state)) == pytest.approx(0.5)


def test_inject_hyperparams_schedule_is_recorded():
    tx = optim.inject_hyperparams(optim.adam)(learning_rate=optim.linear_schedule(1.0, 0.0, 4))
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    seen = []
    for _ in range(3):
        _, state = tx.update({"w": torch.ones(2)}, state, params)
        seen.append(float(optim.learning_rate(state)))
    assert seen == pytest.approx([1.0, 0.75, 0.5])


def test_multi_steps_equals_mean_gradient_step():
    params, data = _problem(torch.float64)
    (x1, y1), (x2, y2) = data[:2]
    acc = optim.multi_steps(optim.adam(0.1), 2)
    s = acc.init(params)
    p = params
    for x, y in ((x1, y1), (x2, y2)):
        u, s = acc.update(torch.func.grad(_loss)(p, x, y), s, p)
        if x is x1:
            assert all(float(v.abs().max()) == 0 for v in u.values())
        p = optim.apply_updates(p, u)
    plain = optim.adam(0.1)
    g = pytree.tree_map(lambda a, b: (a + b) / 2, torch.func.grad(_loss)(params, x1, y1),
                        torch.func.grad(_loss)(params, x2, y2))
    u, _ = plain.update(g, plain.init(params), params)
    expected = optim.apply_updates(params, u)
    assert all(torch.allclose(p[k], expected[k], atol=1e-12) for k in p)
    assert int(s.gradient_step) == 1 and int(s.mini_step) == 0


def test_apply_if_finite_skips_and_counts():
    tx = optim.apply_if_finite(optim.adam(0.1))
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    u, state = tx.update({"w": torch.tensor([1.0, math.nan])}, state, params)
    assert torch.equal(u["w"], torch.zeros(2))
    assert int(state.total_notfinite) == 1 and not bool(state.last_finite)
    assert int(state.inner_state[0].count) == 0  # the inner state did not move
    u, state = tx.update({"w": torch.ones(2)}, state, params)
    assert bool(state.last_finite) and int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1
    assert float(u["w"].abs().min()) > 0


def test_state_from_another_tree_is_a_clear_error():
    tx = optim.adam(0.1)
    other = tx.init({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing: \['w'\]"):
        tx.update({"w": torch.zeros(3)}, other, {"w": torch.zeros(3)})
    reshaped = tx.init({"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": torch.zeros(3)}, reshaped, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="another optimizer"):
        optim.chain(optim.sgd(0.1), optim.sgd(0.1)).update({"w": torch.zeros(3)}, (None,), None)


def test_global_norm():
    tree = {"a": torch.full((4,), 3.0), "b": torch.full((1,), 4.0, dtype=torch.bfloat16)}
    assert float(optim.global_norm(tree)) == pytest.approx(math.sqrt(36 + 16))
    assert fx.optim.global_norm(tree).dtype == torch.float32


BIAS_CORRECTED = {
    "adam": lambda: optim.adam(1.0),
    "nadam": lambda: optim.adam(1.0, nesterov=True),
    "radam": lambda: optim.radam(1.0),
    "amsgrad": lambda: optim.amsgrad(1.0),
    "adamax": lambda: optim.adamax(1.0),
    "lamb": lambda: optim.lamb(1.0),
    "injected_adam": lambda: optim.inject_hyperparams(optim.adam)(learning_rate=1.0),
    "ema": lambda: optim.ema(0.999),
}


@pytest.mark.parametrize("name", BIAS_CORRECTED)
def test_float32_updates_are_as_precise_as_their_float64_formula(name):
    """Each float32 update is within a few roundings of the same optimizer in float64, over
    100 steps: 1 - b2^t is taken in float64 (as torch.optim does), because in float32 the
    rounding of 0.999 itself puts it 1.3e-5 relative off, a bias of ~50 eps in every step.

    Norm-wise: a moment summed in another order is a few eps off, so 8 eps of the whole update."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    grads = [torch.randn(64, generator=g, dtype=torch.float64) * (1 + t / 50) for t in range(100)]
    txs = {dtype: BIAS_CORRECTED[name]() for dtype in (torch.float32, torch.float64)}
    states = {dtype: txs[dtype].init({"w": w.to(dtype)}) for dtype in txs}
    worst = 0.0
    for grad in grads:
        out = {}
        for dtype, tx in txs.items():
            out[dtype], states[dtype] = tx.update({"w": grad.to(dtype)}, states[dtype],
                                                  {"w": w.to(dtype)})
        exact = out[torch.float64]["w"]
        worst = max(worst, float((out[torch.float32]["w"].double() - exact).norm() / exact.norm()))
    assert worst <= 8 * torch.finfo(torch.float32).eps, f"{name}: {worst:.3g} relative"
