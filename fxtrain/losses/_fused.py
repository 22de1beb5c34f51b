"""``fx.losses.chunked_causal_lm``'s kernels: fxtrain's own chunk loop (``_chunked_ce``, every
device) or Liger-Kernel's fused linear cross-entropy (Triton, CUDA), chosen by ``impl``.

Liger's ``fused_linear_cross_entropy_forward`` does what fxtrain's chunk loop does (each chunk's
logits, loss and their gradient in the forward, the gradients with respect to the hidden states,
the weight and the bias accumulated chunk by chunk), with each chunk's softmax and gradient one
Triton kernel written over the logits. Liger's own ``torch.autograd.Function`` has no
``setup_context``, so ``torch.func`` cannot transform it, and it reads a count back to the host
(``.item()``), which Dynamo cannot trace. So it is not called: its forward function is, inside
an operator of fxtrain's own (``fxtrain::liger_linear_cross_entropy``, opaque to Dynamo, with
a vmap rule), under a Function of fxtrain's own that keeps the gradients and scales them by the
loss's incoming gradient in the backward, as ``_chunked_ce``'s does. The loss therefore runs on
both gradient paths (``torch.func`` and autograd) and inside a compiled step, neither refused
nor replaced. Liger takes the loss summed (``reduction="sum"``), its weight gradient
accumulated in float32, the products in autocast's dtype (read where the loss is traced, as
``_chunked_ce`` does); it sizes its own chunks (about ``tokens x width`` logits at a time), so
``chunk_size`` does not apply. Its count read back is one host sync per step. While a CUDA
graph is captured (``fx.cuda_graphed``) no count can be read back: the operator runs
fxtrain's chunk loop there instead.

Checked against liger-kernel 0.8.5 (``liger_kernel.ops.fused_linear_cross_entropy``, whose
forward takes ``compute_gradients``: the operator's inputs never require grad, and without it
Liger would compute no gradients). An older Liger is refused by name.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from . import _chunked as _chunked_ce
from ._mean import IGNORE_INDEX, Mean
from .._torch.traced_errors import fail, run_while_tracing

IMPLS = ("auto", "chunked", "liger")
LIGER_MODULE = "liger_kernel.ops.fused_linear_cross_entropy"
LIGER_DEVICES = ("cuda",)  # Triton kernels
_NAME = "fx.losses.chunked_causal_lm"


def chunked_causal_lm(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                      shift: bool = True, bias: torch.Tensor | None = None,
                      impl: str = "chunked") -> Mean:
    """``fx.losses.causal_lm(F.linear(hidden, weight, bias), labels)`` without the logits.

    The same ``Mean`` (sum of the float32 cross-entropy over the labelled tokens and their
    count), with the same gradients with respect to ``hidden``, ``weight`` and ``bias``, but
    only a chunk of tokens' logits exists at a time, in the forward and the backward. On both
    gradient paths (``torch.func`` and autograd), eager or compiled in one graph.

    Args:
      hidden: ``(batch, length, width)``, the LM head's input (the model's final hidden
        states), any float dtype; under autocast the head's products run as autocast says.
      weight: ``(vocab, width)``, the head's weight (with tied embeddings, the embedding's).
      labels: ``(batch, length)`` token ids, ``ignore_index`` where no loss is taken.
      chunk_size: tokens per chunk of fxtrain's own loop; each chunk holds a
        ``(chunk_size, vocab)`` block. Liger sizes its own chunks.
      shift: True (transformers' convention): position ``t`` predicts label ``t + 1``; False:
        ``labels`` are already the targets of each position.
      bias: ``(vocab,)``, the head's bias, if it has one.
      impl: ``"chunked"`` (the default): fxtrain's own chunk loop, on any device, no read on
        the host; ``"liger"``: Liger-Kernel's fused linear cross-entropy (``pip install
        liger-kernel``; CUDA only, refused elsewhere, naming the fix), which reads a count
        back to the host once a step (a sync the default never makes); ``"auto"``: Liger
        where it can run (CUDA tensors, liger-kernel importable), else fxtrain's own. Where
        no gradient is taken (an eval step), the loss alone, by fxtrain's own loop, whatever
        ``impl`` says.

    Examples:
        >>> hidden, weight = torch.randn(1, 5, 4), torch.randn(7, 4)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100]])
        >>> loss = fx.losses.chunked_causal_lm(hidden, weight, labels, chunk_size=2)
        >>> plain = fx.losses.causal_lm(hidden @ weight.T, labels)
        >>> int(loss.count), bool(torch.allclose(loss.total, plain.total))
        (2, True)
    """
    kernel = chosen(impl, hidden.device.type)
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    tracked = torch.is_grad_enabled() and any(map(_chunked_ce._tracked, inputs))
    if kernel == "chunked" or not tracked:
        return _chunked_ce.chunked_causal_lm(hidden, weight, labels, chunk_size=chunk_size,
                                             ignore_index=ignore_index, shift=shift, bias=bias)
    _chunked_ce._check(hidden, weight, labels, chunk_size, bias)
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = _LigerLinearCrossEntropy.apply(flat, weight, bias, targets, ignore_index,
                                           chunk_size)[0]
    return Mean(total, (targets != ignore_index).sum())


def chosen(impl: str, device: str) -> str:
    """The kernel ``impl`` means for tensors on ``device``: ``"chunked"`` or ``"liger"``;
    ``impl="liger"`` where Liger cannot run is refused, with the reason and the fix."""
    if impl not in IMPLS:
        fail(ValueError, f"{_NAME}: impl must be one of {', '.join(map(repr, IMPLS))}; got "
                         f"{impl!r}")
    if impl == "chunked":
        return "chunked"
    missing = liger_missing(device)
    if not missing:
        return "liger"
    if impl == "liger":
        fail(ValueError, f"{_NAME}: impl='liger' {missing}; pass impl='chunked' (fxtrain's "
                         f"own kernel, any device) or impl='auto' (Liger where it runs)")
    return "chunked"


@run_while_tracing  # a constant to a compiled step: Dynamo cannot trace an import
def liger_missing(device: str) -> str:
    """Why Liger's kernel cannot run on ``device`` ("" when it can)."""
    if device not in LIGER_DEVICES:
        return (f"runs Liger-Kernel's Triton kernels, on {' or '.join(LIGER_DEVICES)} only; "
                f"the hidden states are on {device}")
    try:
        forward = _liger_forward()
    except ImportError as error:
        return f"needs liger-kernel (pip install liger-kernel; {error})"
    if "compute_gradients" not in inspect.signature(forward).parameters:
        return ("needs liger-kernel 0.8.5 or later (its fused_linear_cross_entropy_forward "
                "takes compute_gradients); pip install -U liger-kernel")
    return ""


def _liger_forward():
    return importlib.import_module(LIGER_MODULE).fused_linear_cross_entropy_forward


class _LigerLinearCrossEntropy(torch.autograd.Function):
    """``_chunked_ce._LinearCrossEntropy`` over Liger's kernel: ``forward`` returns ``(total,
    grad_hidden, grad_weight, grad_bias)``, only ``total`` differentiable; the backward scales
    the gradients (in the autocast dtype) by the incoming gradient in the inputs' dtypes."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, targets, ignore_index, chunk_size):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
            torch.promote_types(hidden.dtype, weight.dtype)
        total, grad_hidden, grad_weight, grad_bias = _liger_grads(
            hidden, weight, bias, targets, ignore_index, chunk_size, dtype)
        return total, grad_hidden, grad_weight, grad_bias if bias is not None else None

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias = inputs[:3]
        grads = output[1:]
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        del unused  # the gradients are not differentiable outputs
        if grad_total is None:
            return None, None, None, None, None, None
        scaled = [None if g is None else g.to(dtype) * grad_total
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, None, None, None)


@torch.library.custom_op("fxtrain::liger_linear_cross_entropy", mutates_args=())
def _liger_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore_index: int, chunk_size: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """The summed loss and its gradients by Liger's forward, the products in ``dtype`` (no
    bias: an empty ``grad_bias``); fxtrain's chunk loop while a CUDA graph is captured."""
    if _capturing(hidden):
        total, grad_hidden, grad_weight, grad_bias = _chunked_ce._chunked_grads(
            hidden, weight, bias, targets, chunk_size, ignore_index, dtype)
        return (total, grad_hidden, grad_weight.to(dtype),
                grad_bias.to(dtype) if bias is not None else grad_bias)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    with torch.autocast(hidden.device.type, enabled=False):
        out = _liger_forward()(cast(hidden), cast(weight), targets, bias=cast(bias),
                               ignore_index=ignore_index, reduction="sum",
                               accum_dtype=torch.float32, compute_gradients=True,
                               weight_requires_grad=True)
    total, (grad_hidden, grad_weight, grad_bias) = out[0], out[-3:]
    return (total.float(), grad_hidden, grad_weight,
            grad_bias if grad_bias is not None else hidden.new_empty(0, dtype=torch.float32))


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


@_liger_grads.register_fake
def _(hidden, weight, bias, targets, ignore_index, chunk_size, dtype):
    vocab, width = weight.shape
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape, dtype=dtype),
            weight.new_empty((vocab, width), dtype=dtype),
            weight.new_empty((vocab,) if bias is not None else (0,),
                             dtype=dtype if bias is not None else torch.float32))


@torch.library.register_vmap("fxtrain::liger_linear_cross_entropy")
def _(info, in_dims, hidden, weight, bias, targets, ignore_index, chunk_size, dtype):
    """One call per batched entry (a vmap over sequences: per-example gradients)."""
    take = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
    outs = [_liger_grads(take(hidden, in_dims[0], i), take(weight, in_dims[1], i),
                         None if bias is None else take(bias, in_dims[2], i),
                         take(targets, in_dims[3], i), ignore_index, chunk_size, dtype)
            for i in range(info.batch_size)]
    return tuple(torch.stack(parts) for parts in zip(*outs)), (0, 0, 0, 0)
