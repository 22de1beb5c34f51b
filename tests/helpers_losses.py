"""Cases, references and fakes shared by the loss tests of several kinds: the chunked and fused
cross-entropies (tests/unit/test_chunked_ce.py, test_fused_ce.py, their e2e counterparts and the
GPU kit's test) and the losses on several ranks (tests/unit/test_losses.py, tests/ranks/)."""

import os
import subprocess
import sys
import types

import torch
import torch.nn.functional as F

import fxtrain as fx
import fxtrain.losses._fused as fce
from helpers import ROOT


# -- test_losses.py's helpers ---------------------------------------------------------------------

# One update of a linear model from the same start, computed two ways (a full batch, or
# micro-batches summed by their token counts): the gradients differ by float32 rounding of sums
# of at most 26 terms of order 1 (below 1e-5 relative), and SGD moves each parameter by the
# learning rate (0.5) times that: 1e-5 absolute leaves room, far below what weighing the
# micro-batches alike moves (1e-2 and more for these token counts; checked below).
ATOL = 1e-5


# -- test_chunked_ce.py's helpers -----------------------------------------------------------------

def plain(hidden, weight, labels, *, bias=None, shift=True, chunk_size=None):
    """The reference: the whole logits, then ``fx.losses.causal_lm``."""
    del chunk_size
    return fx.losses.causal_lm(F.linear(hidden, weight, bias), labels, shift=shift)


def lm_case(batch, length, width, vocab, seed, dtype=torch.float32):
    """Hidden states, a head (weight, bias) and labels with ``-100`` scattered through them
    and the last row labelled nowhere (padding only)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=g).to(dtype)
    weight = torch.randn(vocab, width, generator=g).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.3] = -100
    labels[-1] = -100
    return hidden, weight, bias, labels


def value_and_grads(loss_fn, autodiff, hidden, weight, bias, labels, **kwargs):
    """``(value, total, count, grads)`` of ``loss_fn``'s ``Mean``, the gradients of its value
    with respect to hidden, weight (and bias, when given) by ``autodiff``."""
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)

    def value(*args):
        mean = loss_fn(args[0], args[1], labels, bias=args[2] if bias is not None else None,
                       **kwargs)
        return mean.value, (mean.total, mean.count)

    if autodiff == "func":
        argnums = tuple(range(len(inputs)))
        grads, (out, (total, count)) = torch.func.grad_and_value(
            value, argnums=argnums, has_aux=True)(*inputs)
        return out, total, count, grads
    leaves = [t.detach().requires_grad_() for t in inputs]
    out, (total, count) = value(*leaves)
    return out.detach(), total.detach(), count, torch.autograd.grad(out, leaves)


# One forward and backward in a fresh process, measured by the kernel's high-water mark of the
# process's resident memory (VmHWM, reset by /proc/self/clear_refs after the inputs exist and a
# small warm-up call has made its one-off allocations): what the loss adds to the inputs at its
# peak, its gradients included. Tensors this large are mmapped by glibc and given back when
# freed, so the mark follows torch's live tensors.
PROBE = """
import re, sys, torch
import fxtrain as fx
import fxtrain.losses._chunked as cce
from fxtrain.losses._chunked import chunked_causal_lm

def high_water():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

def loss(kind, hidden, weight, labels):
    if kind == "plain":
        return fx.losses.causal_lm(hidden @ weight.T, labels).value
    return chunked_causal_lm(hidden, weight, labels, chunk_size=int(kind)).value

def grads(kind, autodiff, hidden, weight, labels):
    if autodiff == "func":
        return torch.func.grad(lambda h, w: loss(kind, h, w, labels), argnums=(0, 1))(
            hidden, weight)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    return torch.autograd.grad(loss(kind, hidden, weight, labels), [hidden, weight])

kind, autodiff, vocab, tokens, width = sys.argv[1:3] + [int(a) for a in sys.argv[3:]]
g = torch.Generator().manual_seed(0)
weight = torch.randn(vocab, width, generator=g).mul_(0.02)
hidden = torch.randn(1, tokens, width, generator=g)
labels = torch.randint(0, vocab, (1, tokens), generator=g)
if autodiff == "compiled":  # torch.func's gradients under Inductor: compiled at full size
    compiled = torch.compile(lambda h, w, l: grads(kind, "func", h, w, l))
    compiled(hidden, weight, labels)
    run = lambda: compiled(hidden, weight, labels)
else:
    grads(kind, autodiff, hidden[:, :32].clone(), weight, labels[:, :32])  # compiles the kernel
    run = lambda: grads(kind, autodiff, hidden, weight, labels)
open("/proc/self/clear_refs", "w").write("5")
before = high_water()
run()
print(high_water() - before)
"""


def peak_bytes(kind, autodiff, vocab=50257, tokens=1024, width=768):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", PROBE, kind, autodiff, str(vocab),
                          str(tokens), str(width)], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return int(out.stdout.split()[-1])


# -- test_fused_ce.py's helpers -------------------------------------------------------------------

def fake_forward(_input, weight, target, ce_weight=None, bias=None, ignore_index=-100,
                 lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                 return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                 return_token_accuracy=False, return_predicted_tokens=False, ce_impl=None,
                 ce_mode=None, token_grad_output=None, compute_gradients=None,
                 weight_requires_grad=None, chunk_mem_const=1):
    """Liger 0.8.5's ``fused_linear_cross_entropy_forward``, in torch ops: the loss of the rows
    with a target (summed or averaged) and its gradients, in the inputs' dtype (the weight's
    accumulated in ``accum_dtype``); each call's arguments recorded in ``CALLS``."""
    CALLS.append({k: v for k, v in locals().items() if k != "token_grad_output"})
    labelled = target != ignore_index
    logits = F.linear(_input, weight, bias).float()
    safe = torch.where(labelled, target, 0)
    loss = torch.where(labelled, logits.logsumexp(1) - logits.gather(1, safe[:, None])[:, 0], 0)
    onehot = F.one_hot(safe, logits.shape[1])
    grad_logits = torch.where(labelled[:, None], logits.softmax(1) - onehot, 0.0)
    if reduction == "mean":
        loss, grad_logits = loss / labelled.sum(), grad_logits / labelled.sum()
    grad_logits = grad_logits.to(_input.dtype)
    grad_input = grad_logits @ weight if compute_gradients else None
    grad_weight = (grad_logits.T @ _input).to(accum_dtype or weight.dtype).to(weight.dtype)
    grad_bias = None if bias is None else grad_logits.sum(0).to(bias.dtype)
    return loss.sum(), None, None, None, grad_input, grad_weight, grad_bias


CALLS: list[dict] = []


def install(monkeypatch, forward=fake_forward):
    """A fake ``liger_kernel`` package whose fused linear cross-entropy module has ``forward``,
    and the CPU counted as a device Liger runs on."""
    CALLS.clear()
    module = types.ModuleType(fce.LIGER_MODULE)
    module.fused_linear_cross_entropy_forward = forward
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fce.LIGER_MODULE, module)
    monkeypatch.setattr(fce, "LIGER_DEVICES", ("cuda", "cpu"))
