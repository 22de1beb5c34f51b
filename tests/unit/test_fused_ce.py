"""``fx.losses.chunked_causal_lm``'s ``impl``: fxtrain's own chunk loop, or Liger-Kernel's fused
linear cross-entropy on CUDA. Here, on the CPU: the choice, the refusals, and the wiring to
Liger's forward through a fake module computing what Liger's documents (loss summed, gradients
with respect to the input, weight and bias); on a GPU with liger-kernel installed, the real
kernel against fxtrain's own (``hardware``)."""

import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

import fxtrain as fx
import fxtrain.losses._chunked as cce
import fxtrain.losses._fused as fce
from helpers import TRACED
from helpers_losses import CALLS, fake_forward, install, lm_case, plain, value_and_grads


def test_the_fake_has_liger_0_8_5s_signature_where_the_loss_calls_it():
    """The names the operator passes are the fake's, and the fake's are Liger 0.8.5's (read
    from its source: ``_input, weight, target, ce_weight, bias, ignore_index, ...``)."""
    names = list(inspect.signature(fake_forward).parameters)
    assert names[:6] == ["_input", "weight", "target", "ce_weight", "bias", "ignore_index"]
    assert {"reduction", "accum_dtype", "compute_gradients", "weight_requires_grad"} <= set(names)


def test_auto_is_fxtrains_own_loop_on_the_cpu_and_without_liger(monkeypatch):
    assert fce.chosen("auto", "cpu") == "chunked"
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel fails
    assert fce.chosen("auto", "cuda") == "chunked"
    assert "pip install liger-kernel" in fce.liger_missing("cuda")
    install(monkeypatch)
    monkeypatch.setattr(fce, "LIGER_DEVICES", ("cuda",))
    assert fce.chosen("auto", "cuda") == "liger" and fce.chosen("auto", "cpu") == "chunked"
    assert fce.chosen("chunked", "cuda") == "chunked"


def test_auto_on_the_cpu_gives_the_chunked_loss_and_calls_no_liger(monkeypatch):
    install(monkeypatch)
    monkeypatch.setattr(fce, "LIGER_DEVICES", ("cuda",))
    hidden, weight, bias, labels = lm_case(2, 5, 4, 7, seed=1)
    got = value_and_grads(fx.losses.chunked_causal_lm, "func", hidden, weight, bias, labels)
    expected = value_and_grads(cce.chunked_causal_lm, "func", hidden, weight, bias, labels)
    assert not CALLS
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case,message", [
    ("device", "on cuda only; the hidden states are on cpu; pass impl='chunked'"),
    ("missing", "needs liger-kernel (pip install liger-kernel"),
    ("old", "needs liger-kernel 0.8.5 or later"),
    ("impl", "impl must be one of 'auto', 'chunked', 'liger'; got 'triton'"),
])
def test_what_cannot_run_is_refused_by_name_with_the_fix(monkeypatch, case, message):
    hidden, weight, _, labels = lm_case(1, 4, 3, 5, seed=0)
    impl = "triton" if case == "impl" else "liger"
    if case == "missing":
        monkeypatch.setattr(fce, "LIGER_DEVICES", ("cpu",))
        monkeypatch.setitem(sys.modules, "liger_kernel", None)
    elif case == "old":
        install(monkeypatch, lambda _input, weight, target, bias=None, ignore_index=-100,
                reduction="mean": None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fx.losses.chunked_causal_lm(hidden.requires_grad_(), weight, labels, impl=impl)


@pytest.mark.parametrize("autodiff", ["autograd", "func"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shift", [True, False])
def test_liger_gets_the_shifted_targets_summed_and_gives_the_plain_loss(monkeypatch, autodiff,
                                                                       with_bias, shift):
    install(monkeypatch)
    hidden, weight, bias, labels = lm_case(2, 6, 4, 9, seed=3)
    labels[labels == -100] = -1  # another ignore index, passed through
    bias = bias if with_bias else None
    got = value_and_grads(fx.losses.chunked_causal_lm, autodiff, hidden, weight, bias, labels,
                          shift=shift, ignore_index=-1, impl="liger")
    expected = value_and_grads(lambda h, w, y, bias=None, shift=True, ignore_index=-1:
                               fx.losses.causal_lm(F.linear(h, w, bias), y, shift=shift,
                                                   ignore_index=ignore_index),
                               autodiff, hidden, weight, bias, labels, shift=shift)
    assert got[2].item() == expected[2].item()
    torch.testing.assert_close(got[:2], expected[:2])
    torch.testing.assert_close(got[3], expected[3])
    (call,) = CALLS
    targets = (labels[:, 1:] if shift else labels).reshape(-1)
    assert torch.equal(call["target"], targets) and call["ignore_index"] == -1
    assert call["_input"].shape == (targets.numel(), 4)
    assert call["reduction"] == "sum" and call["accum_dtype"] == torch.float32
    assert call["compute_gradients"] is True and call["weight_requires_grad"] is True
    assert (call["bias"] is None) == (bias is None)


def test_under_autocast_liger_multiplies_in_its_dtype_and_the_gradients_keep_the_inputs(
        monkeypatch):
    install(monkeypatch)
    hidden, weight, _, labels = lm_case(2, 8, 16, 32, seed=5)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fx.losses.chunked_causal_lm(hidden, weight, labels, impl="liger")
    grads = torch.autograd.grad(loss.value, leaves)
    (call,) = CALLS
    assert call["_input"].dtype == call["weight"].dtype == torch.bfloat16
    assert loss.total.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fx.losses.causal_lm(F.linear(hidden, weight), labels)
    torch.testing.assert_close(loss.value, expected.value, rtol=1e-2, atol=1e-2)


def test_without_a_gradient_liger_is_not_called(monkeypatch):
    install(monkeypatch)
    hidden, weight, _, labels = lm_case(1, 5, 4, 7, seed=2)
    with torch.no_grad():
        loss = fx.losses.chunked_causal_lm(hidden, weight, labels, impl="liger")
    assert not CALLS
    torch.testing.assert_close(loss.total, plain(hidden, weight, labels).total)


def test_liger_composes_with_vmap(monkeypatch):
    """Per-example gradients: the operator's vmap rule calls Liger once per sequence."""
    install(monkeypatch)
    hidden, weight, _, labels = lm_case(3, 5, 4, 7, seed=4)

    def per_example(loss_fn, **kwargs):
        value = lambda h, w, y: loss_fn(h[None], w, y[None], **kwargs).total  # noqa: E731
        return torch.func.vmap(torch.func.grad(value, argnums=(0, 1)), (0, None, 0))(
            hidden, weight, labels)

    got = per_example(fx.losses.chunked_causal_lm, impl="liger")
    assert len(CALLS) == 3
    torch.testing.assert_close(got, per_example(plain))


def test_while_a_cuda_graph_is_captured_the_operator_runs_fxtrains_own_loop(monkeypatch):
    """No count can be read back during a capture (Liger's ``.item()``); the loop runs there,
    its outputs in the dtypes Liger's would have."""
    install(monkeypatch)
    monkeypatch.setattr(fce, "_capturing", lambda tensor: True)
    hidden, weight, bias, labels = lm_case(2, 5, 4, 7, seed=6)
    got = value_and_grads(fx.losses.chunked_causal_lm, "autograd", hidden, weight, bias, labels,
                          impl="liger")
    assert not CALLS
    torch.testing.assert_close(got, value_and_grads(plain, "autograd", hidden, weight, bias,
                                                    labels))


@pytest.mark.parametrize("autodiff", ["func", "autograd"])
def test_a_compiled_step_with_liger_trains_as_with_fxtrains_own_loop(monkeypatch, autodiff):
    """Inside fxtrain's compiled step (traced), on both gradient paths: the operator is called
    from the graph, and three steps train as with ``impl="chunked"``."""
    install(monkeypatch)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    body = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.LayerNorm(8))
    model = torch.nn.ModuleDict({"body": body, "head": head})
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))

    def run(impl):
        def loss_fn(state, params, batch):
            hidden = torch.func.functional_call(
                state.module.body, {k[5:]: v for k, v in params.items() if k.startswith("body.")},
                (batch,))
            return fx.losses.chunked_causal_lm(hidden, params["head.weight"], batch,
                                               chunk_size=5, impl=impl)

        state = fx.TrainState.create(model, fx.optim.adamw(1e-2))
        step = torch.compile(fx.make_train_step(loss_fn, autodiff=autodiff), fullgraph=True,
                             backend=TRACED)
        losses = []
        for _ in range(3):
            state, metrics = step(state, ids)
            losses.append(metrics["loss"])
        return torch.stack(losses)

    expected = run("chunked")
    got = run("liger")
    assert len(CALLS) == 3  # one call a step, from the compiled graph
    torch.testing.assert_close(got, expected)


@pytest.mark.hardware
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_on_a_gpu_liger_gives_fxtrains_chunked_loss_and_gradients(autocast):
    """The real kernel (liger-kernel installed: the kit carries its wheel) against fxtrain's own
    chunk loop, at a real vocabulary, on both gradient paths."""
    if fce.liger_missing("cuda"):
        pytest.skip(fce.liger_missing("cuda"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 512, 256, generator=g).cuda()
    weight = (torch.randn(50257, 256, generator=g) * 0.02).cuda()
    labels = torch.randint(0, 50257, (2, 512), generator=g).cuda()
    labels[0, :7] = -100
    for autodiff in ("autograd", "func"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            got = value_and_grads(fx.losses.chunked_causal_lm, autodiff, hidden, weight, None,
                                  labels, impl="liger")
            expected = value_and_grads(fx.losses.chunked_causal_lm, autodiff, hidden, weight,
                                       None, labels, impl="chunked")
        assert got[2].item() == expected[2].item()
        # relative to each tensor's norm: the weight's gradient entries are tiny (1/count x
        # probabilities of 2e-5), below any elementwise tolerance that bfloat16's would pass
        tolerance = 2e-2 if autocast else 1e-4  # bfloat16's 2^-8 rounding; float32's, summed
        for a, b in zip([got[0], *got[3]], [expected[0], *expected[3]]):
            assert ((a - b).norm() / b.norm()).item() < tolerance, (autodiff, a, b)
