"""The pure train and eval steps against plain PyTorch: the same module trained with
``loss.backward()`` and the matching ``torch.optim`` optimizer, or run after ``module.eval()``.

The other step tests compare the step with itself (eager vs compiled); these pin it to an
independent reference, so a wrong gradient scale, a missing BatchNorm update or a wrong mode
shows up even where Adam's normalisation would hide it in the parameters.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from fxtrain import optim
from helpers import classification_batch, mlp

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)

DTYPES = [torch.float32, torch.float64]
SGD_LR = 0.1

# Two correct implementations of a step round differently (other kernels, the same sums in
# another order), and kernels differ between CPUs, so each comparison is bounded by the
# arithmetic, in units of the dtype's epsilon, not by what one machine happens to give:
# - a gradient element is a sum of at most N = batch 16 x fan-in 144 products; summed in
#   another order it agrees to about sqrt(N) eps ~ 48 eps relative: GRAD_RTOL = 64 eps;
# - a step moves a parameter by at most MAX_MOVE = 0.1 here (SGD: lr 0.1 x |g| < 1; Adam:
#   lr 1e-2 x |m_hat / sqrt(v_hat)|, a few units at most), that move is off by GRAD_RTOL of
#   itself, and adding it rounds the parameter (|p| < 1) by eps: k steps apart by param_tol(k);
# - a loss (a mean of log-softmax values) agrees to 16 eps relative, plus what the parameters'
#   difference moves it (|dL/dp|_1 < 1 here).
# The planted bugs stay far outside: a doubled gradient moves an SGD parameter by ~1e-2, a
# missed BatchNorm update moves its running mean by ~1e-1.
MAX_MOVE = 0.1


def grad_rtol(dtype):
    return 64 * torch.finfo(dtype).eps


def param_tol(dtype, steps):
    return steps * (grad_rtol(dtype) * MAX_MOVE + torch.finfo(dtype).eps)


def loss_tol(dtype, loss, steps_before):
    return 16 * torch.finfo(dtype).eps * abs(float(loss)) + param_tol(dtype, steps_before)


def bn_convnet(seed=0):
    """Conv + BatchNorm without dropout. The conv has no bias: BatchNorm subtracts it again, so
    its true gradient is 0 and float32 leaves rounding noise (~1e-8) that Adam normalises into
    steps of order lr, different in any two correct implementations."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


MODELS = {"mlp": (mlp, False, 4), "bn_convnet": (bn_convnet, True, 10)}

# (fxtrain optimizer, torch.optim optimizer on a list of parameters), hyperparameters spelled
# out on both sides except for adamw, which checks that the defaults agree too.
OPTIMIZERS = {
    "sgd": (lambda: optim.sgd(SGD_LR), lambda p: torch.optim.SGD(p, lr=SGD_LR)),
    "sgd_momentum": (lambda: optim.sgd(0.05, momentum=0.9, weight_decay=1e-3),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adam": (lambda: optim.adam(1e-2, b1=0.8, b2=0.99, eps=1e-7, weight_decay=1e-2),
             lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                                        weight_decay=1e-2)),
    "adamw": (lambda: optim.adamw(1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
}


def xent(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def _setup(model_name, opt_name, dtype):
    """A TrainState and an independent deep copy of the same module with its torch optimizer."""
    make, _, _ = MODELS[model_name]
    ours, theirs = OPTIMIZERS[opt_name]
    model = make().to(dtype)
    ref = copy.deepcopy(model).train()
    return fx.TrainState.create(model, ours(), seed=0), ref, theirs(list(ref.parameters()))


def _batches(model_name, dtype, n):
    _, image, classes = MODELS[model_name]
    return [(x.to(dtype), y) for x, y in
            (classification_batch(seed=i, image=image, classes=classes) for i in range(n))]


def _compile(step, mode):
    if mode == "eager":
        return step
    backend = "inductor" if mode == "inductor" else "eager"
    return torch.compile(step, fullgraph=True, backend=backend)


def _reference_backward(ref, opt, batch):
    """zero_grad, forward and backward; returns the loss and a copy of each parameter's .grad."""
    x, y = batch
    opt.zero_grad()
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in ref.named_parameters()}


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def _assert_state_matches(state, ref, tol, where):
    """Params and buffers of ``state`` equal the reference module's, name by name."""
    params = dict(ref.named_parameters())
    assert state.params.keys() == params.keys()
    diff = _max_diff(state.params, {k: v.detach() for k, v in params.items()})
    assert diff <= tol, f"{where}: max |param - reference| = {diff:.3g}"
    buffers = dict(ref.named_buffers())
    assert (state.buffers or {}).keys() == buffers.keys()
    for name, buf in buffers.items():
        if buf.is_floating_point():
            diff = float((state.buffers[name] - buf).abs().max())
            assert diff <= tol, f"{where}: max |{name} - reference| = {diff:.3g}"
        else:
            assert torch.equal(state.buffers[name], buf), f"{where}: {name}"


# Every model, optimizer and dtype runs eagerly; in float32 also compiled with the eager
# backend (Dynamo's tracing of the step); inductor, the default backend, compiles one case per
# model (about 15 s each from a cold cache on 2 cores, so the conv net's is marked slow).
TRAIN_CASES = [
    pytest.param(model, opt, dtype, mode, id=f"{model}-{opt}-{str(dtype)[6:]}-{mode}")
    for model in MODELS for opt in OPTIMIZERS for dtype in DTYPES
    for mode in (("eager", "compiled") if dtype == torch.float32 else ("eager",))
] + [
    pytest.param("mlp", "adamw", torch.float32, "inductor", id="mlp-adamw-float32-inductor"),
    pytest.param("bn_convnet", "sgd_momentum", torch.float64, "inductor",
                 id="bn_convnet-sgd_momentum-float64-inductor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model_name,opt_name,dtype,mode", TRAIN_CASES)
def test_train_step_matches_backward_and_torch_optim(model_name, opt_name, dtype, mode):
    """After each of 5 steps on different batches, the params, the BatchNorm buffers and the
    loss equal those of the module trained with loss.backward() and torch.optim."""
    state, ref, opt = _setup(model_name, opt_name, dtype)
    step = _compile(fx.make_train_step(xent), mode)
    for i, batch in enumerate(_batches(model_name, dtype, 5)):
        state, metrics = step(state, batch)
        loss, _ = _reference_backward(ref, opt, batch)
        opt.step()
        torch.testing.assert_close(metrics["loss"], loss, atol=loss_tol(dtype, loss, i), rtol=0)
        _assert_state_matches(state, ref, param_tol(dtype, i + 1), f"step {i + 1}")
    assert int(state.step) == 5


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("model_name", MODELS)
def test_gradients_and_updates_match_backward(model_name, dtype, mode):
    """The step's gradient norms (per parameter and global) equal the norms of .grad after
    loss.backward(), and with plain SGD its update is exactly -lr * that .grad."""
    state, ref, opt = _setup(model_name, "sgd", dtype)
    step = _compile(fx.make_train_step(xent, grad_stats=True), mode)
    for i, batch in enumerate(_batches(model_name, dtype, 3)):
        tol = param_tol(dtype, i + 1)  # one step apart per step taken
        old = state.params
        state, metrics = step(state, batch)
        _, grads = _reference_backward(ref, opt, batch)
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        opt.step()
        for name, g in grads.items():
            torch.testing.assert_close(metrics[f"grad_norm/{name}"], g.norm(), atol=tol,
                                       rtol=grad_rtol(dtype),
                                       msg=lambda m: f"step {i + 1}, grad_norm/{name}: {m}")
        global_norm = torch.stack([g.norm() for g in grads.values()]).norm()
        torch.testing.assert_close(metrics["grad_norm"], global_norm, atol=tol,
                                   rtol=grad_rtol(dtype))
        ours = {k: state.params[k] - old[k] for k in old}
        theirs = {n: p.detach() - before[n] for n, p in ref.named_parameters()}
        assert _max_diff(ours, theirs) <= tol, f"step {i + 1}: updates differ"
        assert _max_diff(ours, {k: -SGD_LR * g for k, g in grads.items()}) <= tol


def _eval_logits(state, params, batch):
    return {"logits": state.apply(params, batch[0])}


EVAL_MODELS = {
    "bn_convnet": (bn_convnet, True),
    "mlp_dropout": (lambda: mlp(dropout=0.5), False),
}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("model_name", EVAL_MODELS)
def test_eval_step_equals_module_eval_forward(model_name, mode):
    """make_eval_step runs the module as module.eval() does (BatchNorm on its running
    statistics, dropout off), not in train mode, and leaves the module's mode as it was."""
    make, image = EVAL_MODELS[model_name]
    ref = make().train()
    x, y = classification_batch(n=32, image=image, classes=10 if image else 4)
    with torch.no_grad():  # moves BatchNorm's running statistics away from their initial values
        for seed in range(3):
            ref(classification_batch(n=32, seed=seed + 1, image=image)[0])
        train_out = ref(x)
        expected = ref.eval()(x)
    ref.train()
    assert not torch.allclose(train_out, expected)  # train mode would give another answer
    state = fx.TrainState.create(copy.deepcopy(ref), optim.sgd(0.1), seed=0)
    eval_step = _compile(fx.make_eval_step(_eval_logits), mode)
    out = eval_step(state, (x, y))["logits"]
    assert torch.equal(out, expected)
    assert state.module.training
