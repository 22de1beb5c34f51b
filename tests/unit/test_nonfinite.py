"""``fx.debug.find_nonfinite``: NaNs and infinities planted in known places are named by op,
module path and side, eagerly on both gradient paths and as compiled Inductor kernels, and the
check leaves the state, torch's random generator and its settings as it found them."""

import warnings

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from helpers import TRACED
from torch import nn

import fxtrain as fx

AUTODIFFS = ("func", "autograd")


class Attention(nn.Module):
    """A projection, then ``tanh``; with ``poison``, ``log`` instead (NaN where it is < 0)."""

    def __init__(self, poison=False):
        super().__init__()
        self.qkv, self.poison = nn.Linear(4, 4), poison

    def forward(self, x):
        h = self.qkv(x)
        return torch.log(h) if self.poison else torch.tanh(h)


class Norm(nn.Module):
    """The rows' Euclidean norms: finite at a zero row, but with an infinite gradient there (the
    backward of ``sqrt`` at 0 divides by 0; times the zero row's own gradient, NaN)."""

    def forward(self, h):
        return torch.sqrt((h * h).sum(-1, keepdim=True))


class NanGradient(torch.autograd.Function):
    """The identity whose backward gives NaN."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class BadGradient(nn.Module):
    def forward(self, h):
        return NanGradient.apply(h).sum(-1, keepdim=True)


class Block(nn.Module):
    def __init__(self, poison=False, norm=None):
        super().__init__()
        self.attention, self.norm = Attention(poison), norm

    def forward(self, x):
        h = self.attention(x)
        return h if self.norm is None else self.norm(h * (x[:, :1] != 0))


class Model(nn.Module):
    """Parallel blocks read the same input (so two poisoned blocks start two NaNs of their own);
    their sum goes through a head. ``masked``: then through a causal softmax over its features,
    whose ``-inf`` mask the forward makes first."""

    def __init__(self, poisoned=(), norm=None, masked=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [Block(i in poisoned, norm() if norm and i == 1 else None) for i in range(2)])
        self.head, self.masked = nn.Linear(4, 1), masked

    def forward(self, x):
        mask = torch.full((4, 4), float("-inf")).triu(1) if self.masked else None
        h = sum(block(x) for block in self.blocks)
        if mask is not None:
            h = torch.softmax(h[:, :, None] * h[:, None, :] + mask, -1).sum(-1)
        return self.head(h)


def loss_fn(state, params, batch):
    return state.apply(params, batch).square().mean()


def batch(n=6, zero_row=False):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    if zero_row:
        x[0, 0] = 0.0  # Block's mask zeroes that row before the norm
    return x


@pytest.mark.parametrize("autodiff", AUTODIFFS)
def test_a_forward_nan_is_named_by_op_module_and_side(autodiff):
    state = fx.TrainState.create(Model(poisoned=(1,)), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn, autodiff=autodiff)
    report = fx.debug.find_nonfinite(step, state, batch())
    assert (report.mode, report.op, report.module, report.module_type, report.side) == (
        "eager", "aten.log.default", "blocks.1.attention", "Attention", "forward")
    assert report.value == "output 0" and report.values.nan > 0
    assert report.values.shape == (6, 4) and report.values.dtype == torch.float32
    assert report.where.endswith("in forward") and "test_nonfinite.py" in report.where
    assert "metrics['loss']" in report.reaches
    assert "state.params['blocks.1.attention.qkv.weight']" in report.reaches
    text = str(report)
    assert "aten.log.default, forward, in blocks.1.attention (Attention)" in text
    assert f"{report.values.nan} nan of 24 (shape (6, 4), torch.float32)" in text


@pytest.mark.parametrize("autodiff", AUTODIFFS)
def test_the_first_of_two_nans_is_named(autodiff):
    """Both blocks make NaNs of their own; block 0's log runs first."""
    state = fx.TrainState.create(Model(poisoned=(0, 1)), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn, autodiff=autodiff)
    report = fx.debug.find_nonfinite(step, state, batch())
    assert (report.op, report.module) == ("aten.log.default", "blocks.0.attention")


def test_an_attention_masks_infinity_beside_a_nan_is_not_blamed():
    """The mask's -inf is made first and meets the NaN in the masked scores; the NaN there is
    the log's, not the mask's (and without the log every result is finite)."""
    step = fx.make_train_step(loss_fn)
    masked = fx.TrainState.create(Model(masked=True), fx.optim.sgd(0.1))
    assert fx.debug.find_nonfinite(step, masked, batch()) is None
    poisoned = fx.TrainState.create(Model(poisoned=(1,), masked=True), fx.optim.sgd(0.1))
    report = fx.debug.find_nonfinite(step, poisoned, batch())
    assert (report.op, report.module) == ("aten.log.default", "blocks.1.attention")


@pytest.mark.parametrize("autodiff", AUTODIFFS)
@pytest.mark.parametrize("norm, op, node", [(Norm, "aten.div.Tensor", "SqrtBackward0"),
                                            (BadGradient, "aten.mul.Tensor", "NanGradient")])
def test_a_backward_only_nan_is_named_as_backward_with_its_module(autodiff, norm, op, node):
    state = fx.TrainState.create(Model(norm=norm), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn, autodiff=autodiff)
    report = fx.debug.find_nonfinite(step, state, batch(zero_row=True))
    assert (report.mode, report.op, report.module, report.side) == (
        "eager", op, "blocks.1.norm", "backward")
    assert node in report.detail and report.module_type == norm.__name__
    assert "test_nonfinite.py" in report.where  # the forward's line of that node
    _, metrics = step(state, batch(zero_row=True))
    assert torch.isfinite(metrics["loss"]) and not torch.isfinite(metrics["grad_norm"])


def test_a_nonfinite_value_that_reaches_no_result_is_not_reported():
    """sqrt's backward at a zero row is infinite, but that row's mask zeroes it before it
    reaches a gradient (``where``-like): every result is finite."""
    class Masked(nn.Module):
        def forward(self, h):
            return torch.sqrt(h.relu()).sum(-1, keepdim=True)

    state = fx.TrainState.create(Model(norm=Masked), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn)
    assert fx.debug.find_nonfinite(step, state, batch(zero_row=True)) is None
    assert fx.debug.find_nonfinite(step, state, batch()) is None


def test_a_nonfinite_state_or_batch_is_reported_as_the_input():
    state = fx.TrainState.create(Model(), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn)
    bad = state.replace(params={**state.params, "head.bias": torch.tensor([float("inf")])})
    report = fx.debug.find_nonfinite(step, bad, batch())
    assert (report.mode, report.side, report.value) == (
        "input", "input", "state.params['head.bias']")
    assert report.values.inf == 1
    x = batch()
    x[2, 1] = float("nan")
    assert fx.debug.find_nonfinite(step, state, x).value == "batch"
    assert fx.debug.find_nonfinite(step, state, {"x": x}).value == "batch['x']"


def test_a_compiled_step_runs_as_the_function_it_compiled_and_donates_nothing():
    state = fx.TrainState.create(Model(poisoned=(1,)), fx.optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(loss_fn, donate=True), fullgraph=True)
    before = fx.tree_digest(state)
    report = fx.debug.find_nonfinite(step, state, batch())  # eager finds it: nothing compiles
    assert (report.mode, report.module) == ("eager", "blocks.1.attention")
    assert fx.tree_digest(state) == before and not fx.donation.given_up(state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_a_nonfinite_result_no_watched_op_wrote_is_still_reported():
    """What no op or kernel seen wrote (an op Inductor runs outside its kernels) is reported as
    the result itself."""
    from fxtrain.debug._report import found
    from fxtrain.debug._taint import Taint

    outs = [("metrics['loss']", torch.tensor(1.0)), ("metrics['grad_norm']", torch.tensor(
        float("nan")))]
    report = found("compiled", Taint(), outs)
    assert (report.op, report.side, report.value, report.reaches) == (
        "", "unknown", "metrics['grad_norm']", ("metrics['grad_norm']",))
    assert str(report).startswith("compiled step: metrics['grad_norm'] is not finite\n")
    assert found("compiled", Taint(), outs[:1]) is None


def _settings():
    """Dynamo's and Inductor's settings, each value itself (``get_config_copy`` copies them)."""
    with warnings.catch_warnings():  # deprecated keys warn when read
        warnings.simplefilter("ignore")
        return [{k: getattr(config, k) for k in config.get_config_copy()}
                for config in (torch._dynamo.config, inductor_config)]


def _relu_bug():
    """Inductor's test switch: its C++ kernels compute relu(x) as x + 1."""
    return inductor_config.patch({"cpp.inject_relu_bug_TESTING_ONLY": "accuracy"})


class OnlyCompiledNan(nn.Module):
    """sqrt(-relu(-|h|)) is sqrt(0) eagerly, NaN where |h| < 1 in kernels whose relu is x + 1
    (the branch is cut from the gradient, so the eager backward stays finite)."""

    def forward(self, h):
        return (h + torch.sqrt(-torch.relu(-h.detach().abs()))).sum(-1, keepdim=True)


def test_a_nan_only_the_compiled_kernels_make_is_named_by_kernel():
    state = fx.TrainState.create(Model(norm=OnlyCompiledNan), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn)
    x = batch() * 0.1
    assert fx.debug.find_nonfinite(step, state, x, compiled=False) is None
    settings, rng, digest = _settings(), torch.get_rng_state(), fx.tree_digest(state)
    with _relu_bug():
        patched = _settings()
        report = fx.debug.find_nonfinite(step, state, x, compiled=True)
        assert _settings() == patched
    assert (report.mode, report.side, report.module, report.module_type) == (
        "compiled", "forward", "blocks.1.norm", "OnlyCompiledNan")
    assert "relu" in report.op and "sqrt" in report.op and report.values.nan > 0
    assert "aten.relu" in report.detail and "metrics['loss']" in report.reaches
    assert str(report).startswith(f"compiled kernel {report.op}, forward, in blocks.1.norm")
    # the state, torch's generator and its settings are as they were
    assert fx.tree_digest(state) == digest and torch.equal(torch.get_rng_state(), rng)
    assert _settings() == settings


def test_a_finite_compiled_step_reports_nothing_and_keeps_its_own_compile():
    state = fx.TrainState.create(Model(norm=OnlyCompiledNan), fx.optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(loss_fn), backend=TRACED, fullgraph=True)
    x = batch() * 0.1
    step(state, x)
    settings = _settings()
    assert fx.debug.find_nonfinite(step, state, x) is None  # compiled: the step is compiled
    assert _settings() == settings
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(state, x)  # the user's compiled step is still the one it was


def test_bad_arguments_are_refused_clearly():
    state = fx.TrainState.create(Model(), fx.optim.sgd(0.1))
    step = fx.make_train_step(loss_fn)
    with pytest.raises(TypeError, match="train_step must be the step"):
        fx.debug.find_nonfinite(None, state, batch())
    with pytest.raises(TypeError, match="state must be a TrainState, got dict"):
        fx.debug.find_nonfinite(step, {"params": state.params}, batch())
    with pytest.raises(TypeError, match="returned dict, not \\(state, metrics\\)"):
        fx.debug.find_nonfinite(fx.make_eval_step(lambda s, p, b: {"x": b.sum()}), state,
                                batch())
    with pytest.raises(RuntimeError, match="failed on this state and batch.*shapes cannot"):
        fx.debug.find_nonfinite(step, state, torch.ones(6, 3))  # 3 features, not 4
    donated = fx.make_train_step(loss_fn, donate=True)
    donated(state, batch())
    with pytest.raises(fx.DonatedError):
        fx.debug.find_nonfinite(step, state, batch())
