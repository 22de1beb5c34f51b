"""Attention with keyed dropout that keeps no attention matrix for its backward.

``F.scaled_dot_product_attention(q, k, v, dropout_p=p)`` inside a train step runs as the math
of SDPA's reference (``fx.random``): scores, softmax, a keyed mask, the weighted values. Left
to autodiff, that math keeps a ``(batch, heads, queries, keys)`` block per layer for the
backward (the dropped weights, bfloat16 under autocast, and their boolean mask: 3 bytes an
element), where torch's fused kernels draw their dropout inside the kernel and keep none.
GPT-2 124M at 120 x 1024 tokens: 4.2 GiB a layer, 50 GiB over 12 layers, and the step ran out
of an H200's memory where torch's own loop held 111 GiB.

``attention`` is a ``torch.autograd.Function`` that keeps what flash attention keeps: ``q``,
``k``, ``v``, the log-sum-exp of each row of scores, and the key. Its backward
computes the scores again, the weights from them and the log-sum-exp, and the mask from the
key (integer hashing: the same bits), then the gradients by the softmax's rule. One layer's
attention matrix exists at a time, in its forward and in its backward. It has a
``setup_context``, so ``torch.func`` transforms it, and ``torch.compile`` traces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              key: torch.Tensor, p: float, scale: float,
              keep: Callable[[torch.Tensor, torch.Size, float], torch.Tensor]) -> torch.Tensor:
    """``dropout(softmax(q k^T scale + mask), p) v`` with the dropout's mask ``keep(key,
    shape, p)`` (``fx.random``'s keyed draw, True where a weight is kept), ``mask`` boolean
    (True: take part) or additive (a constant: it gets no gradient), or None."""
    return _Attention.apply(q, k, v, mask, key, p, scale, keep)[0]


def _weights(q, k, mask, scale):
    """The scores in ``q``'s dtype, masked, in float32 at least."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def _scaled_keep(keep, key, shape, p, dtype):
    """The dropout's mask as the factor each weight is multiplied by: 0 or 1 / (1 - p)."""
    return keep(key, shape, p).to(dtype) * (1.0 / (1.0 - p) if p < 1.0 else 0.0)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, mask, key, p, scale, keep):
        with torch.autocast(q.device.type, enabled=False):
            scores = _weights(q, k, mask, scale)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            dropped = torch.exp(scores - lse) * _scaled_keep(keep, key, scores.shape, p,
                                                                 scores.dtype)
            return dropped.to(v.dtype) @ v, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        q, k, v, mask, key, p, scale, keep = inputs
        lse = output[1]
        ctx.save_for_backward(q, k, v, mask, key, lse)
        ctx.p, ctx.scale, ctx.keep = p, scale, keep
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, grad_lse: Any) -> tuple:
        del grad_lse  # lse is not differentiable
        q, k, v, mask, key, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            weights = torch.exp(_weights(q, k, mask, ctx.scale) - lse)
            keep = _scaled_keep(ctx.keep, key, weights.shape, ctx.p, weights.dtype)
            grad_out = grad_out.to(v.dtype)
            grad_v = (weights * keep).to(v.dtype).transpose(-2, -1) @ grad_out
            grad_weights = (grad_out @ v.transpose(-2, -1)).to(keep.dtype) * keep
            grad_scores = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True))
            grad_scores = grad_scores.to(q.dtype) * ctx.scale
            grad_q = grad_scores @ k
            grad_k = grad_scores.transpose(-2, -1) @ q
        return grad_q, grad_k, grad_v, None, None, None, None, None

