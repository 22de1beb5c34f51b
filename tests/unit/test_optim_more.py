"""Adafactor, schedule-free, Muon, lookahead, clip_by_block_rms and skip_large_updates: each
equals optax's over a run in float64 (same names and arguments), and torch.optim's where torch has
the same algorithm; each compiles to one graph, keeps its state through a checkpoint, and refuses
bad settings by name."""

import functools

import pytest
import torch
from torch import nn

import fxtrain as fx
from fxtrain import optim

import optax_parity as parity
from helpers import extra
from syncs import HostReads

F64 = "float64"  # optax's accumulators in float64, given as a dtype name for either library
LABELS = {"w": True, "b": False, "s": True}
MUON_DIMS = {"w": optim.MuonDimensionNumbers(0, 1), "b": None, "s": None}  # optax's layout


def _dims(o, reduction=0, output=1):
    return {"w": o.contrib.MuonDimensionNumbers(reduction, output), "b": None, "s": None}


# name -> (ours, optax's), both given the optax module; the arguments are optax's names
OPTAX = {
    "adafactor": (lambda o: optim.adafactor(0.05, min_dim_size_to_factor=2),
                  lambda o: o.adafactor(0.05, min_dim_size_to_factor=2)),
    "adafactor_defaults": (lambda o: optim.adafactor(0.05), lambda o: o.adafactor(0.05)),
    "adafactor_args": (
        lambda o: optim.adafactor(0.05, min_dim_size_to_factor=1, decay_rate=0.7, decay_offset=-5,
                                  multiply_by_parameter_scale=False, clipping_threshold=None,
                                  momentum=0.9, dtype_momentum=torch.float64,
                                  weight_decay_rate=0.01, eps=1e-20, weight_decay_mask=LABELS),
        lambda o: o.adafactor(0.05, min_dim_size_to_factor=1, decay_rate=0.7, decay_offset=-5,
                              multiply_by_parameter_scale=False, clipping_threshold=None,
                              momentum=0.9, dtype_momentum=F64, weight_decay_rate=0.01,
                              eps=1e-20, weight_decay_mask=LABELS)),
    "scale_by_factored_rms": (
        lambda o: optim.chain(optim.scale_by_factored_rms(min_dim_size_to_factor=3, decay_rate=0.9,
                                                          epsilon=1e-20), optim.scale(-0.01)),
        lambda o: o.chain(o.scale_by_factored_rms(min_dim_size_to_factor=3, decay_rate=0.9,
                                                  epsilon=1e-20), o.scale(-0.01))),
    "clip_by_block_rms": (lambda o: optim.chain(optim.clip_by_block_rms(0.5), optim.scale(-0.1)),
                          lambda o: o.chain(o.clip_by_block_rms(0.5), o.scale(-0.1))),
    "scale_by_param_block_rms": (
        lambda o: optim.chain(optim.scale_by_param_block_rms(0.5), optim.scale(-0.01)),
        lambda o: o.chain(o.scale_by_param_block_rms(0.5), o.scale(-0.01))),
    "ema": (lambda o: optim.chain(optim.ema(0.8), optim.scale(-0.1)),
            lambda o: o.chain(o.ema(0.8), o.scale(-0.1))),
    "muon": (lambda o: optim.muon(0.02, muon_weight_dimension_numbers=MUON_DIMS),
             lambda o: o.contrib.muon(0.02)),
    "muon_torch_layout": (lambda o: optim.muon(0.02),  # our default: (out, in)
                          lambda o: o.contrib.muon(0.02, muon_weight_dimension_numbers=_dims(o, 1, 0))),
    "muon_args": (
        lambda o: optim.muon(0.02, ns_steps=4, beta=0.9, eps=1e-6, weight_decay=0.1,
                             nesterov=False, adaptive=True, preconditioning="spectral",
                             adam_b1=0.8, adam_b2=0.99, adam_eps_root=1e-8, adam_weight_decay=0.1,
                             adam_learning_rate=0.01, muon_weight_dimension_numbers=MUON_DIMS,
                             consistent_rms=0.2),
        lambda o: o.contrib.muon(0.02, ns_steps=4, beta=0.9, eps=1e-6, weight_decay=0.1,
                                 nesterov=False, adaptive=True, preconditioning="spectral",
                                 adam_b1=0.8, adam_b2=0.99, adam_eps_root=1e-8,
                                 adam_weight_decay=0.1, adam_learning_rate=0.01,
                                 consistent_rms=0.2)),
    "muon_aol": (lambda o: optim.muon(0.02, preconditioning="aol",
                                      muon_weight_dimension_numbers=MUON_DIMS),
                 lambda o: o.contrib.muon(0.02, preconditioning="aol")),
    "muon_schatten_dion": (
        lambda o: optim.muon(0.02, ns_coeffs="dion", preconditioning="schatten",
                             muon_weight_dimension_numbers=MUON_DIMS),
        lambda o: o.contrib.muon(0.02, ns_coeffs="dion", preconditioning="schatten")),
    "schedule_free_sgd": (lambda o: optim.schedule_free_sgd(0.1),
                          lambda o: o.contrib.schedule_free_sgd(0.1)),
    # optax reads its warm-up at an int32 count, in float32: about 4e-8 apart after 60 steps
    "schedule_free_sgd_args": (
        lambda o: optim.schedule_free_sgd(0.1, warmup_steps=10, b1=0.8, weight_decay=0.1,
                                          weight_lr_power=1.0),
        lambda o: o.contrib.schedule_free_sgd(0.1, warmup_steps=10, b1=0.8, weight_decay=0.1,
                                              weight_lr_power=1.0)),
    "schedule_free_adamw": (lambda o: optim.schedule_free_adamw(0.02),
                            lambda o: o.contrib.schedule_free_adamw(0.02)),
    "schedule_free_adamw_args": (
        lambda o: optim.schedule_free_adamw(0.02, warmup_steps=5, b1=0.95, b2=0.99, eps=1e-6,
                                            weight_decay=0.1),
        lambda o: o.contrib.schedule_free_adamw(0.02, warmup_steps=5, b1=0.95, b2=0.99,
                                                eps=1e-6, weight_decay=0.1)),
    "schedule_free": (lambda o: optim.schedule_free(optim.adam(0.02, b1=0.0), 0.02, b1=0.95),
                      lambda o: o.contrib.schedule_free(o.adam(0.02, b1=0.0), 0.02, b1=0.95)),
    "multi_steps_skip_large_updates": (
        lambda o: optim.multi_steps(optim.adam(0.05), 3, should_skip_update_fn=functools.partial(
            optim.skip_large_updates, max_squared_norm=20.0)),
        lambda o: o.MultiSteps(o.adam(0.05), 3, accumulator_dtype=F64,
                               should_skip_update_fn=functools.partial(
                                   o.skip_large_updates, max_squared_norm=20.0)
                               ).gradient_transformation()),
}


@pytest.mark.parametrize("name", OPTAX)
def test_equals_optax_in_float64(name, x64):
    optax = extra("optax")
    ours, theirs = OPTAX[name]
    params = parity.params()
    grads = parity.grads(params)
    a, b = parity.run_fx(ours(optax), params, grads), parity.run_optax(theirs(optax), params, grads)
    assert all(b[k].dtype == torch.float64 for k in b)
    moved = parity.max_diff(a, params)
    assert moved > 1e-3, f"{name} hardly moved the parameters ({moved:.3g})"
    diff = parity.max_diff(a, b)
    assert diff <= 1e-7, f"{name}: max |dparam| vs optax = {diff:.3g} after {parity.STEPS} steps"


def test_skip_large_updates_skips_what_optax_skips(x64):
    optax = extra("optax")
    ours, theirs = OPTAX["multi_steps_skip_large_updates"]
    params = parity.params()
    grads = parity.grads(params)
    _, state = parity.run_fx_with_state(ours(optax), params, grads)
    _, ref = parity.run_optax_with_state(theirs(optax), params, grads)
    assert 0 < int(state.gradient_step) < parity.STEPS // 3  # some mini-steps were skipped
    assert int(state.gradient_step) == int(ref.gradient_step)
    assert int(state.mini_step) == int(ref.mini_step)
    assert bool(state.skip_state["should_skip"]) == bool(ref.skip_state["should_skip"])
    assert abs(float(state.skip_state["norm_squared"]) - float(ref.skip_state["norm_squared"])) < 1e-9


def test_skip_large_updates_skips_nan_and_inf_as_optax(x64):
    optax = extra("optax")
    for bad in (float("nan"), float("inf")):
        grads = {"w": torch.tensor([bad, 0.0], dtype=torch.float64)}
        skip, info = optim.skip_large_updates(grads, torch.tensor(0), None, max_squared_norm=1.0)
        ref, _ = optax.skip_large_updates(parity.to_jax(grads), 0, None, max_squared_norm=1.0)
        assert bool(skip) is bool(ref) is True
    small = {"w": torch.tensor([0.5, 0.5], dtype=torch.float64)}
    assert not bool(optim.skip_large_updates(small, torch.tensor(0), None, 1.0)[0])


def test_skip_not_finite_equals_optax(x64):
    optax = extra("optax")
    params = parity.params()
    grads = parity.grads(params)
    for i, grad in enumerate(grads[::4]):
        grad["b"][i % 3] = float("inf") if i % 2 else float("nan")
    ours = optim.multi_steps(optim.sgd(0.1), 2, should_skip_update_fn=optim.skip_not_finite)
    theirs = optax.MultiSteps(optax.sgd(0.1), 2, accumulator_dtype=F64,
                              should_skip_update_fn=optax.skip_not_finite).gradient_transformation()
    a, state = parity.run_fx_with_state(ours, params, grads)
    assert all(bool(torch.isfinite(v).all()) for v in a.values())
    assert parity.max_diff(a, parity.run_optax(theirs, params, grads)) <= 1e-7
    assert int(state.gradient_step) == (parity.STEPS - len(grads[::4])) // 2


@pytest.mark.parametrize("name", [k for k in OPTAX if k.startswith("schedule_free")])
def test_schedule_free_eval_params_equal_optax(name, x64):
    optax = extra("optax")
    ours, theirs = OPTAX[name]
    params = parity.params()
    grads = parity.grads(params)
    y, state = parity.run_fx_with_state(ours(optax), params, grads)
    ref_y, ref_state = parity.run_optax_with_state(theirs(optax), params, grads)
    x = optim.schedule_free_eval_params(state, y)
    ref_x = parity.to_torch(optax.contrib.schedule_free_eval_params(ref_state, ref_y))
    assert parity.max_diff(x, y) > 1e-3  # x is not y
    assert parity.max_diff(x, ref_x) <= 1e-7


@pytest.mark.parametrize("kwargs", [dict(sync_period=7, slow_step_size=0.5),
                                    dict(sync_period=8, slow_step_size=0.3, reset_state=True)])
def test_lookahead_fast_and_slow_equal_optax(kwargs, x64):
    optax = extra("optax")
    params = parity.params()
    grads = parity.grads(params)
    fast, state = parity.run_fx_with_state(optim.lookahead(optim.adam(0.05), **kwargs), params,
                                           grads)
    ref, _ = parity.run_optax_with_state(optax.lookahead(optax.adam(0.05), **kwargs), params,
                                         grads, wrap=optax.LookaheadParams.init_synced)
    pair = optim.lookahead_params(state, fast)
    assert parity.max_diff(pair.slow, params) > 1e-3
    assert parity.max_diff(pair.slow, pair.fast) > 1e-3  # 60 is no multiple of the period
    assert parity.max_diff(pair.fast, parity.to_torch(ref.fast)) <= 1e-7
    assert parity.max_diff(pair.slow, parity.to_torch(ref.slow)) <= 1e-7


@pytest.mark.parametrize("preconditioning", ["frobenius", "aol"])
def test_scale_by_muon_equals_optax(preconditioning, x64):
    optax = extra("optax")
    params = {"w": parity.params()["w"]}
    grads = parity.grads(params)
    ours = optim.chain(optim.scale_by_muon(ns_coeffs=((4.0, -6.0, 2.5), (3.4, -4.7, 2.0)),
                                           beta=0.9, preconditioning=preconditioning),
                       optim.scale(-0.02))
    # optax's scale_by_muon needs its dimension numbers (its default None fails in jax.tree.map)
    theirs = optax.chain(optax.contrib.scale_by_muon(
        ns_coeffs=((4.0, -6.0, 2.5), (3.4, -4.7, 2.0)), beta=0.9, preconditioning=preconditioning,
        weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers()}), optax.scale(-0.02))
    a = parity.run_fx(ours, params, grads)
    assert parity.max_diff(a, params) > 1e-3
    assert parity.max_diff(a, parity.run_optax(theirs, params, grads)) <= 1e-7


def test_muon_orthogonalises_batched_weights_as_optax(x64):
    optax = extra("optax")
    g = torch.Generator().manual_seed(0)
    params = {"conv": torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    grads = parity.grads(params)
    spec = {"conv": optim.MuonDimensionNumbers(reduction_axis=(0,), output_axis=2), "b": None}
    ours = optim.muon(0.02, muon_weight_dimension_numbers=spec)
    theirs = optax.contrib.muon(0.02, muon_weight_dimension_numbers={
        "conv": optax.contrib.MuonDimensionNumbers(reduction_axis=(0,), output_axis=2),
        "b": None})
    a = parity.run_fx(ours, params, grads)
    assert parity.max_diff(a, params) > 1e-3
    assert parity.max_diff(a, parity.run_optax(theirs, params, grads)) <= 1e-7


def _run_torch(make_opt, params, grads):
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make_opt(list(tensors.values()))
    for grad in grads:
        for k, t in tensors.items():
            t.grad = grad[k].clone()
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


@pytest.mark.parametrize("dtype,steps,tol", [(torch.float32, 5, 1e-6), (torch.float64, 60, 1e-8)])
def test_adafactor_equals_torch_optim(dtype, steps, tol):
    # torch factors the last two axes (ours the two largest: the same for matrices), steps by
    # min(lr, 1/sqrt(t)) (lr while t <= 1/lr^2) and decays by lr * weight_decay; its decay
    # schedule is float64 where ours is float32, as optax's (1e-8 apart after 60 steps)
    params = parity.params(dtype)
    grads = parity.grads(params, steps)
    ours = optim.adafactor(0.01, min_dim_size_to_factor=1, decay_rate=0.8, clipping_threshold=1.0,
                           weight_decay_rate=0.01 * 0.1)
    theirs = _run_torch(lambda p: torch.optim.Adafactor(
        p, lr=0.01, beta2_decay=-0.8, d=1.0, weight_decay=0.1, eps=(1e-15, 1e-3)), params, grads)
    a = parity.run_fx(ours, params, grads)
    assert parity.max_diff(a, params) > 1e-2
    diff = parity.max_diff(a, theirs)
    assert diff <= tol, f"max |dparam| vs torch.optim.Adafactor = {diff:.3g} after {steps} steps"


def test_muon_equals_torch_optim_up_to_its_bfloat16():
    # torch.optim.Muon orthogonalises in bfloat16 (8 bits of mantissa: 0.4% per rounding), so the
    # two agree to about 1% of the distance moved; its Nesterov momentum, g + beta B, is not
    # bias-corrected (optax's is), so the comparison is without Nesterov. A wrong width scale
    # (sqrt(3/5) for sqrt(5/3)) or decay would be off by tens of percent.
    params = {"w": parity.params(torch.float32)["w"]}
    grads = parity.grads(params, 5)
    ours = optim.muon(0.02, beta=0.95, eps=1e-7, weight_decay=0.1, nesterov=False)
    theirs = _run_torch(lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1, momentum=0.95,
                                                   nesterov=False, eps=1e-7), params, grads)
    a = parity.run_fx(ours, params, grads)
    moved = parity.max_diff(a, params)
    assert parity.max_diff(a, theirs) <= 0.02 * moved


ALIASES = {
    "adafactor": lambda: optim.adafactor(0.01, min_dim_size_to_factor=2, momentum=0.9,
                                         weight_decay_rate=1e-3),
    "clip_by_block_rms": lambda: optim.chain(optim.clip_by_block_rms(0.1), optim.sgd(0.1)),
    "schedule_free_sgd": lambda: optim.schedule_free_sgd(0.1, warmup_steps=2),
    "schedule_free_adamw": lambda: optim.schedule_free_adamw(0.01, weight_decay=0.1),
    "muon": lambda: optim.muon(0.02, weight_decay=0.1),
    "lookahead": lambda: optim.lookahead(optim.adam(0.02), sync_period=2, slow_step_size=0.5,
                                         reset_state=True),
    "skip_large_updates": lambda: optim.multi_steps(
        optim.adam(0.02), 2, should_skip_update_fn=functools.partial(
            optim.skip_large_updates, max_squared_norm=20.0)),
}


@pytest.mark.parametrize("name", ALIASES)
def test_compiles_to_one_graph_without_recompiling(name):
    tx = ALIASES[name]()
    params = parity.params(torch.float32)
    grads = parity.grads(params, 4)
    ours = parity.run_compiled(tx, params, grads)
    assert parity.max_diff(ours, parity.run_fx(tx, params, grads)) <= 1e-6


@pytest.mark.parametrize("name", ALIASES)
def test_updates_read_nothing_back_to_the_host(name):
    tx = ALIASES[name]()
    params = parity.params(torch.float32)
    grads = parity.grads(params, 3)
    state = tx.init(params)
    with HostReads() as reads:
        for grad in grads:
            updates, state = tx.update(grad, state, params)
            params = optim.apply_updates(params, updates)
    assert reads.count == 0, reads.report()


@pytest.mark.parametrize("name", ALIASES)
def test_state_survives_a_checkpoint(name, tmp_path):
    parity.checkpoint_round_trip(ALIASES[name], lambda: nn.Linear(3, 2), tmp_path)


def test_lookahead_slow_params_evaluate_a_train_state():
    tx = optim.lookahead(optim.sgd(0.1), sync_period=2, slow_step_size=0.5)
    state = fx.TrainState.create(nn.Linear(2, 1), tx)
    start = dict(state.params)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    state = state.apply_gradients(grads)
    pair = optim.lookahead_params(state.opt_state, state.params)
    assert all(torch.equal(pair.slow[k], start[k]) for k in start)  # no sync yet
    state = state.apply_gradients(grads)  # the sync: fast = slow = start - 0.5 * 0.2
    pair = optim.lookahead_params(state.opt_state, state.params)
    for k in start:
        torch.testing.assert_close(pair.slow[k], start[k] - 0.1)
        torch.testing.assert_close(pair.fast[k], pair.slow[k])


def test_eval_params_are_found_inside_wrappers():
    params = parity.params(torch.float32)
    grads = parity.grads(params, 2)
    plain = optim.schedule_free_sgd(0.1)
    wrapped = optim.apply_if_finite(optim.inject_hyperparams(optim.schedule_free_sgd)(
        learning_rate=0.1))
    (y, s), (y2, s2) = (parity.run_fx_with_state(t, params, grads) for t in (plain, wrapped))
    torch.testing.assert_close(optim.schedule_free_eval_params(s2, y2),
                               optim.schedule_free_eval_params(s, y))
    with pytest.raises(ValueError, match="holds no ScheduleFreeState"):
        optim.schedule_free_eval_params(optim.sgd(0.1).init(params), params)
    with pytest.raises(ValueError, match="holds no LookaheadState"):
        optim.lookahead_params(optim.sgd(0.1).init(params), params)


@pytest.mark.parametrize("make,match", [
    (lambda: optim.adafactor(-0.1), "adafactor: learning_rate"),
    (lambda: optim.adafactor(0.1, momentum=1.0), "adafactor: momentum"),
    (lambda: optim.adafactor(0.1, clipping_threshold=0.0), "adafactor: clipping_threshold"),
    (lambda: optim.adafactor(0.1, eps=-1.0), "adafactor: eps"),
    (lambda: optim.scale_by_factored_rms(min_dim_size_to_factor=0),
     "scale_by_factored_rms: min_dim_size_to_factor"),
    (lambda: optim.scale_by_factored_rms(decay_rate=-0.8), "scale_by_factored_rms: decay_rate"),
    (lambda: optim.clip_by_block_rms(0.0), "clip_by_block_rms: threshold"),
    (lambda: optim.scale_by_param_block_rms(-1.0), "scale_by_param_block_rms: min_scale"),
    (lambda: optim.ema(1.5), "ema: decay"),
    (lambda: optim.schedule_free_sgd(0.1, b1=0.0), "schedule_free: b1"),
    (lambda: optim.schedule_free_adamw(0.1, b2=1.0), "schedule_free_adamw: b2"),
    (lambda: optim.schedule_free_adamw(-0.1), "schedule_free_adamw: learning_rate"),
    (lambda: optim.schedule_free(optim.sgd(0.1), 0.1, weight_lr_power=-1.0),
     "schedule_free: weight_lr_power"),
    (lambda: optim.muon(0.1, ns_coeffs="fast"), "muon: unknown ns_coeffs preset 'fast'"),
    (lambda: optim.muon(0.1, ns_coeffs=(1.0, 2.0)), "muon: ns_coeffs must be"),
    (lambda: optim.muon(0.1, ns_coeffs="dion", ns_steps=3), "muon: 5 rows of ns_coeffs"),
    (lambda: optim.muon(-0.1), "muon: learning_rate"),
    (lambda: optim.scale_by_muon(beta=1.0), "scale_by_muon: beta"),
    (lambda: optim.scale_by_muon(preconditioning="svd"), "scale_by_muon: preconditioning"),
    (lambda: optim.lookahead(optim.sgd(0.1), sync_period=0, slow_step_size=0.5),
     "lookahead: sync_period"),
    (lambda: optim.lookahead(optim.sgd(0.1), sync_period=2, slow_step_size=1.5),
     "lookahead: slow_step_size"),
])
def test_bad_settings_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_are_refused_by_name():
    params = parity.params(torch.float32)
    grads = parity.grads(params, 1)[0]
    tx = optim.scale_by_muon()
    with pytest.raises(ValueError, match=r"parameter 'b' of shape \(3,\) is not a matrix"):
        tx.update(grads, tx.init(params))
    tx = optim.muon(0.1, muon_weight_dimension_numbers={
        "w": optim.MuonDimensionNumbers(0, 0), "b": None, "s": None})
    with pytest.raises(ValueError, match=r"reduction axes \(0,\) and output axes \(0,\) overlap"):
        tx.update(grads, tx.init(params), params)
    tx = optim.lookahead(optim.sgd(0.1), sync_period=2, slow_step_size=0.5)
    with pytest.raises(ValueError, match="lookahead needs the fast params"):
        tx.update(grads, tx.init(params))
    for tx in (optim.adafactor(0.1), optim.schedule_free_sgd(0.1)):
        with pytest.raises(ValueError, match="needs params"):
            tx.update(grads, tx.init(params))
    tx = optim.multi_steps(optim.sgd(0.1), 2, should_skip_update_fn=lambda u, step, p: (
        torch.tensor(1.0), None))
    with pytest.raises(ValueError, match="should_skip_update_fn must return a 0-d bool"):
        tx.init(params)
