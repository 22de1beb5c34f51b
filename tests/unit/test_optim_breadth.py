"""The optimizers that bring fx.optim toward optax's breadth: each equals optax's over a run in
float64, and torch.optim's where torch has the same optimizer; each compiles to one graph, keeps
its state through a checkpoint, and refuses bad settings by name."""

import pytest
import torch
from torch import nn

from fxtrain import optim

import optax_parity as parity
from helpers import extra

MASK = {"w": True, "b": False, "s": True}  # a dict of bools by name: a mask for optax and us
OTHER = {"w": False, "b": True, "s": True}


# name -> (ours, optax's), both given the optax module; the arguments are optax's names
OPTAX = {
    "adagrad": (lambda: optim.adagrad(0.1), lambda o: o.adagrad(0.1)),
    "adagrad_args": (lambda: optim.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-3),
                     lambda o: o.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-3)),
    "scale_by_rss": (lambda: optim.scale_by_rss(), lambda o: o.scale_by_rss()),
    "adamax": (lambda: optim.adamax(0.02, b1=0.8, b2=0.99), lambda o: o.adamax(0.02, b1=0.8, b2=0.99)),
    "scale_by_adamax": (lambda: optim.scale_by_adamax(), lambda o: o.scale_by_adamax()),
    "amsgrad": (lambda: optim.amsgrad(0.02, b2=0.9), lambda o: o.amsgrad(0.02, b2=0.9)),
    "amsgrad_no_correction": (
        lambda: optim.amsgrad(0.02, eps_root=1e-6, bias_correction_mu=False, bias_correction_nu=False),
        lambda o: o.amsgrad(0.02, eps_root=1e-6, bias_correction_mu=False, bias_correction_nu=False)),
    "scale_by_amsgrad": (lambda: optim.scale_by_amsgrad(), lambda o: o.scale_by_amsgrad()),
    "nadamw": (lambda: optim.nadamw(0.02, weight_decay=0.1), lambda o: o.nadamw(0.02, weight_decay=0.1)),
    "nadamw_plain": (lambda: optim.nadamw(0.02, eps_root=1e-6, nesterov=False),
                     lambda o: o.nadamw(0.02, eps_root=1e-6, nesterov=False)),
    "adam_nesterov": (lambda: optim.adam(0.02, nesterov=True), lambda o: o.adam(0.02, nesterov=True)),
    "scale_by_adam_nesterov": (lambda: optim.scale_by_adam(b1=0.8, eps_root=1e-8, nesterov=True),
                               lambda o: o.scale_by_adam(b1=0.8, eps_root=1e-8, nesterov=True)),
    "radam": (lambda: optim.radam(0.02), lambda o: o.radam(0.02)),
    "radam_args": (lambda: optim.radam(0.02, b2=0.9, eps_root=1e-6, threshold=4.5, nesterov=True),
                   lambda o: o.radam(0.02, b2=0.9, eps_root=1e-6, threshold=4.5, nesterov=True)),
    "scale_by_radam": (lambda: optim.scale_by_radam(), lambda o: o.scale_by_radam()),
    "clip": (lambda: optim.chain(optim.clip(0.5), optim.scale(-0.1)),
             lambda o: o.chain(o.clip(0.5), o.scale(-0.1))),
    "lamb": (lambda: optim.lamb(0.02, weight_decay=0.1), lambda o: o.lamb(0.02, weight_decay=0.1)),
    "lamb_masked": (lambda: optim.lamb(0.02, eps_root=1e-6, weight_decay=0.1, mask=MASK),
                    lambda o: o.lamb(0.02, eps_root=1e-6, weight_decay=0.1, mask=MASK)),
    "scale_by_trust_ratio": (
        lambda: optim.chain(optim.scale_by_trust_ratio(0.1, 0.5, 1e-3), optim.scale(-0.01)),
        lambda o: o.chain(o.scale_by_trust_ratio(0.1, 0.5, 1e-3), o.scale(-0.01))),
    "lars": (lambda: optim.lars(0.5, weight_decay=0.1), lambda o: o.lars(0.5, weight_decay=0.1)),
    "lars_masked": (
        lambda: optim.lars(0.5, weight_decay=0.1, weight_decay_mask=MASK, trust_coefficient=0.01,
                           eps=1e-3, trust_ratio_mask=OTHER, momentum=0.8, nesterov=True),
        lambda o: o.lars(0.5, weight_decay=0.1, weight_decay_mask=MASK, trust_coefficient=0.01,
                         eps=1e-3, trust_ratio_mask=OTHER, momentum=0.8, nesterov=True)),
    "adabelief": (lambda: optim.adabelief(0.02), lambda o: o.adabelief(0.02)),
    "adabelief_nesterov": (lambda: optim.adabelief(0.02, b1=0.8, eps=1e-8, nesterov=True),
                           lambda o: o.adabelief(0.02, b1=0.8, eps=1e-8, nesterov=True)),
    "yogi": (lambda: optim.yogi(0.05), lambda o: o.yogi(0.05)),
    "adadelta": (lambda: optim.adadelta(1.0, rho=0.8, weight_decay=0.1, weight_decay_mask=MASK),
                 lambda o: o.adadelta(1.0, rho=0.8, weight_decay=0.1, weight_decay_mask=MASK)),
    "sign_sgd": (lambda: optim.sign_sgd(0.01), lambda o: o.sign_sgd(0.01)),
    "fromage": (lambda: optim.fromage(0.05), lambda o: o.fromage(0.05)),
    "optimistic_gradient_descent": (
        lambda: optim.optimistic_gradient_descent(0.02, alpha=0.5, beta=0.8),
        lambda o: o.optimistic_gradient_descent(0.02, alpha=0.5, beta=0.8)),
    "adamaxw": (lambda: optim.adamaxw(0.02, weight_decay=0.1, mask=MASK),
                lambda o: o.adamaxw(0.02, weight_decay=0.1, mask=MASK)),
    "nadam": (lambda: optim.nadam(0.02, b2=0.99), lambda o: o.nadam(0.02, b2=0.99)),
    "rprop": (lambda: optim.rprop(0.01, eta_minus=0.4, max_step_size=0.05),
              lambda o: o.rprop(0.01, eta_minus=0.4, max_step_size=0.05)),
    "novograd": (lambda: optim.novograd(0.02, weight_decay=0.1),
                 lambda o: o.novograd(0.02, weight_decay=0.1)),
    "adan": (lambda: optim.adan(0.02, weight_decay=0.1, mask=MASK),
             lambda o: o.adan(0.02, weight_decay=0.1, mask=MASK)),
}


@pytest.mark.parametrize("name", OPTAX)
def test_equals_optax_in_float64(name, x64):
    optax = extra("optax")
    ours, theirs = OPTAX[name]
    params = parity.params()
    grads = parity.grads(params)
    a, b = parity.run_fx(ours(), params, grads), parity.run_optax(theirs(optax), params, grads)
    assert all(b[k].dtype == torch.float64 for k in b)
    moved = parity.max_diff(a, params)
    assert moved > 1e-3, f"{name} hardly moved the parameters ({moved:.3g})"
    diff = parity.max_diff(a, b)
    assert diff <= 1e-7, f"{name}: max |dparam| vs optax = {diff:.3g} after {parity.STEPS} steps"


def test_zero_nans_equals_optax(x64):
    optax = extra("optax")
    params = parity.params()
    grads = parity.grads(params)
    for i, grad in enumerate(grads[::3]):
        grad["w"][i % 5, i % 3] = float("nan")
    ours = optim.chain(optim.zero_nans(), optim.scale(-0.1))
    theirs = optax.chain(optax.zero_nans(), optax.scale(-0.1))
    diff = parity.max_diff(parity.run_fx(ours, params, grads), parity.run_optax(theirs, params, grads))
    assert diff <= 1e-7
    _, (state, _) = ours.update(grads[0], ours.init(params), params)
    _, (ref_state, _) = theirs.update(parity.to_jax(grads[0]), theirs.init(parity.to_jax(params)))
    assert {k: bool(v) for k, v in state.found_nan.items()} == {
        k: bool(v) for k, v in ref_state.found_nan.items()} == {"w": True, "b": False, "s": False}


# name -> (ours, torch's), with torch's arguments mapped explicitly to optax's names
TORCH = {
    # torch: sum starts at initial_accumulator_value, u = g / (sqrt(sum) + eps); eps=0 both ways
    "adagrad": (lambda: optim.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
                lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1, eps=0.0)),
    "adamax": (lambda: optim.adamax(0.02, b1=0.8, b2=0.99, eps=1e-8),
               lambda p: torch.optim.Adamax(p, lr=0.02, betas=(0.8, 0.99), eps=1e-8)),
    # torch takes the max of v before its bias correction, optax after: equal when b2 = 0
    "amsgrad": (lambda: optim.amsgrad(0.02, b1=0.9, b2=0.0, eps=1e-8),
                lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.9, 0.0), eps=1e-8, amsgrad=True)),
    # torch's momentum schedule b1 (1 - 0.5 * 0.96^(t momentum_decay)) is optax's constant b1
    # when momentum_decay is huge; its decoupled decay p <- p (1 - lr wd) is optax's lr wd p
    "nadamw": (lambda: optim.nadamw(0.02, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1),
               lambda p: torch.optim.NAdam(p, lr=0.02, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.1, momentum_decay=1e9,
                                           decoupled_weight_decay=True)),
    # torch's eps sits outside the bias correction of v: eps=0 both ways
    "radam": (lambda: optim.radam(0.02, b1=0.9, b2=0.999, eps=0.0),
              lambda p: torch.optim.RAdam(p, lr=0.02, betas=(0.9, 0.999), eps=0.0)),
}


def _run_torch(make_opt, params, grads):
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    before = torch.get_default_dtype()
    torch.set_default_dtype(tensors["w"].dtype)  # NAdam keeps its momentum product in this dtype
    try:
        opt = make_opt(list(tensors.values()))
        for grad in grads:
            for k, t in tensors.items():
                t.grad = grad[k].clone()
            opt.step()
    finally:
        torch.set_default_dtype(before)
    return {k: v.detach() for k, v in tensors.items()}


@pytest.mark.parametrize("name", TORCH)
@pytest.mark.parametrize("dtype,steps,tol", [(torch.float32, 5, 1e-6), (torch.float64, parity.STEPS, 1e-10)])
def test_parity_with_torch_optim(name, dtype, steps, tol):
    ours, theirs = TORCH[name]
    params = parity.params(dtype)
    grads = parity.grads(params, steps)
    diff = parity.max_diff(parity.run_fx(ours(), params, grads), _run_torch(theirs, params, grads))
    assert diff <= tol, f"{name}: max |dparam| vs torch.optim = {diff:.3g} after {steps} steps"


ALIASES = {
    "adagrad": lambda: optim.adagrad(0.1),
    "adamax": lambda: optim.adamax(0.02),
    "amsgrad": lambda: optim.amsgrad(0.02),
    "nadamw": lambda: optim.nadamw(0.02),
    "radam": lambda: optim.radam(0.02),
    "lamb": lambda: optim.lamb(0.02, weight_decay=0.1),
    "lars": lambda: optim.lars(0.1, weight_decay=0.1),
    "clip_zero_nans": lambda: optim.chain(optim.zero_nans(), optim.clip(0.1), optim.sgd(0.1)),
    "adabelief": lambda: optim.adabelief(0.02),
    "yogi": lambda: optim.yogi(0.02),
    "adadelta": lambda: optim.adadelta(1.0),
    "sign_sgd": lambda: optim.sign_sgd(0.01),
    "fromage": lambda: optim.fromage(0.05),
    "optimistic_gradient_descent": lambda: optim.optimistic_gradient_descent(0.02),
    "adamaxw": lambda: optim.adamaxw(0.02),
    "nadam": lambda: optim.nadam(0.02),
    "rprop": lambda: optim.rprop(0.01),
    "novograd": lambda: optim.novograd(0.02),
    "adan": lambda: optim.adan(0.02),
}


@pytest.mark.parametrize("name", ALIASES)
def test_compiles_to_one_graph_without_recompiling(name):
    tx = ALIASES[name]()
    params = parity.params(torch.float32)
    grads = parity.grads(params, 3)
    ours = parity.run_compiled(tx, params, grads)
    assert parity.max_diff(ours, parity.run_fx(tx, params, grads)) <= 1e-6


@pytest.mark.parametrize("name", ALIASES)
def test_state_survives_a_checkpoint(name, tmp_path):
    parity.checkpoint_round_trip(ALIASES[name], lambda: nn.Linear(3, 2), tmp_path)


@pytest.mark.parametrize("make,match", [
    (lambda: optim.adagrad(-0.1), "adagrad: learning_rate"),
    (lambda: optim.adagrad(0.1, eps=-1.0), "adagrad: eps"),
    (lambda: optim.adagrad(0.1, initial_accumulator_value=-1.0), "adagrad: initial_accumulator_value"),
    (lambda: optim.adamax(0.1, b1=1.0), "adamax: b1"),
    (lambda: optim.adamax(0.1, eps=-1e-8), "adamax: eps"),
    (lambda: optim.amsgrad(-1.0), "amsgrad: learning_rate"),
    (lambda: optim.amsgrad(0.1, b2=-0.1), "amsgrad: b2"),
    (lambda: optim.nadamw(0.1, weight_decay=-1.0), "nadamw: weight_decay"),
    (lambda: optim.radam(0.1, eps=-1.0), "radam: eps"),
    (lambda: optim.scale_by_rss(eps=-1.0), "scale_by_rss: eps"),
    (lambda: optim.scale_by_radam(b2=1.5), "scale_by_radam: b2"),
    (lambda: optim.clip(-1.0), "clip: max_delta"),
    (lambda: optim.lamb(0.1, b1=1.0), "lamb: b1"),
    (lambda: optim.lamb(-0.1), "lamb: learning_rate"),
    (lambda: optim.lars(0.1, momentum=-0.9), "lars: momentum"),
    (lambda: optim.lars(0.1, trust_coefficient=-1.0), "lars: trust_coefficient"),
    (lambda: optim.adabelief(0.1, b1=1.0), "scale_by_belief: b1"),
    (lambda: optim.yogi(-0.1), "yogi: learning_rate"),
    (lambda: optim.adadelta(1.0, rho=1.5), "scale_by_adadelta: rho"),
    (lambda: optim.sign_sgd(-1.0), "sign_sgd: learning_rate"),
    (lambda: optim.adamaxw(0.1, weight_decay=-1.0), "adamaxw: weight_decay"),
])
def test_bad_settings_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()
