"""Ring attention over a context-parallel group: torch's own ring, run with the CPU's kernel.

Each rank of the group holds two chunks of every sequence, head and tail (torch's round-robin
load balance for causal attention: ``fxtrain.distributed._context.slots``). Causal attention
over the whole sequence is then torch's ``_templated_ring_attention``: the ranks pass their keys
and values around the ring, each block's attention runs in the SDPA kernel, and the blocks'
outputs merge by their log-sum-exp; the backward is ``_templated_ring_attention_backward``,
which passes the keys' and values' gradients around the ring the other way.

Torch's ``context_parallel()`` runs that ring by dispatching SDPA's CUDA kernels (flash,
efficient, cuDNN) on DTensors; on a CPU, SDPA's kernel is
``_scaled_dot_product_flash_attention_for_cpu``, which torch's dispatcher does not route to the
ring. ``ring_attention`` calls the same ring functions with that kernel, so the wiring
(chunks, ring, merge, backward) is torch's on any device that runs the CPU kernel. A CUDA
tensor is refused by name: there, torch's kernels are the ones to ring, and fxtrain has not
been measured on one.

The forward and the backward are two custom ops, ``fxtrain::ring_attention`` and
``fxtrain::ring_attention_backward``, the second the first's gradient (``register_autograd``),
each decomposed into the ring's collectives and kernels where a step is traced. As an
``autograd.Function`` the ring's backward, traced, sat outside the step's backward region
(Dynamo marks the ops of the ``torch.autograd.grad`` it traces, not a Function's own backward
graph), which cut that region into one per attention layer; torch's remat of a per-block unit's
gather takes one region only ("Detected 3 disjoint backward regions"), so per-block units were
refused. As an op's gradient the backward runs inside the traced ``grad``.

Checked on torch 2.13.0, 2.14.1 and 2.15.0. The ring functions are private
(``torch.distributed.tensor.experimental._context_parallel._attention``, earlier
``..._attention``); they read torch's ``_cp_options`` (load balance, rotation): this module
reads them and never sets them. Torch 2.11 is refused: its compiled trace of the backward
gave gradients wrong by O(1).

The backward kernel is called by position: torch's ring passes ``out=`` as a keyword, which
Dynamo reads as an out-variant call and refuses.

The other wiring, for packed documents, needs no ring: every rank's keys and values gathered
(``fxtrain._torch.collectives.all_gather_autograd``), as Llama 3's context parallelism does for
document masks.
"""

from __future__ import annotations

from typing import Any

import torch

from .version import require

try:
    from torch.distributed.tensor.experimental._context_parallel import _attention as _ring
except ImportError:  # torch 2.11: the module before it moved
    from torch.distributed.tensor.experimental import _attention as _ring  # type: ignore

_SEQ = 2  # (batch, heads, sequence, head_dim)
_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _repeated(query: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention's keys or values repeated per query head (the kernel takes as
    many as the query); the ring passes them around unrepeated."""
    rep = query.shape[1] // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _block_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   is_causal: bool, scale: float | None = None,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, ...]:
    """One block's attention, as torch's ring calls it, on the CPU's flash kernel."""
    return _FORWARD(query, _repeated(query, key), _repeated(query, value), dropout_p, is_causal,
                    scale=scale)


def _block_backward(*, grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                    is_causal: bool, scale: float | None = None,
                    dropout_p: float = 0.0) -> tuple[torch.Tensor, ...]:
    """One block's backward, as torch's ring calls it (by keyword), in the kernel's order; the
    repeated keys' and values' gradients summed back onto their heads."""
    dq, dk, dv = _BACKWARD(grad_out, query, _repeated(query, key), _repeated(query, value), out,
                           logsumexp, dropout_p, is_causal, scale=scale)
    if dk.shape[1] != key.shape[1]:
        dk = dk.unflatten(1, (key.shape[1], -1)).sum(2)
        dv = dv.unflatten(1, (value.shape[1], -1)).sum(2)
    return dq, dk, dv


def _group(name: str) -> Any:
    """The process group named ``name`` (a custom op's schema takes its name)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


@torch.library.custom_op("fxtrain::ring_attention", mutates_args=())
def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: str,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's ring over the group named ``group``: the output and its log-sum-exp."""
    return _unaliased(_ring_forward_composite(q, k, v, group, scale), (q, k, v))


def _unaliased(outputs: tuple, inputs: tuple) -> tuple:
    """``outputs`` with each that shares memory with an input or an output before it copied
    (a custom op's outputs are new tensors; torch's ring may hand back views of one buffer)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = []
    for t in outputs:
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return tuple(fresh)


def _ring_forward_composite(q, k, v, group, scale):
    out, lse = _ring._templated_ring_attention(_group(group), _SEQ, _block_forward, q, k, v,
                                               is_causal=True, scale=scale)[:2]
    return out, lse


@_ring_forward.register_fake
def _(q, k, v, group, scale):
    del k, v, group, scale
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fxtrain::ring_attention_backward", mutates_args=())
def _ring_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, group: str,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch's ring backward: the keys' and values' gradients go around the other way."""
    return _unaliased(_ring_backward_composite(grad, q, k, v, out, lse, group, scale),
                      (grad, q, k, v, out, lse))


def _ring_backward_composite(grad, q, k, v, out, lse, group, scale):
    dq, dk, dv = _ring._templated_ring_attention_backward(
        _group(group), _SEQ, _block_backward, grad.contiguous(), "grad_out", q, k, v, out, lse,
        is_causal=True, scale=scale)[:3]
    return dq, dk, dv


@_ring_backward.register_fake
def _(grad, q, k, v, out, lse, group, scale):
    del grad, out, lse, group, scale
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ring_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, ctx.group, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _ring_gradients(ctx: Any, grad: torch.Tensor, _lse_grad: Any) -> tuple:
    dq, dk, dv = _ring_backward(grad, *ctx.saved_tensors, ctx.group, ctx.scale)
    return dq, dk, dv, None, None


_ring_forward.register_autograd(_ring_gradients, setup_context=_ring_context)

# What a traced step records of the two ops (below autograd, which keeps the backward above):
# the ring's own collectives and kernels, as fxtrain::all_gather_shard's gather
# (fxtrain._torch.collectives): Inductor orders collectives it sees by the program, and the
# step's backward regions hold the backward's ops, so a unit's gathers recomputed in the
# backward (per-block units) sit in one region with the ring's.
_DECOMPOSED = torch.library.Library("fxtrain", "FRAGMENT")
_DECOMPOSED.impl("ring_attention", _ring_forward_composite, "CompositeImplicitAutograd")
_DECOMPOSED.impl("ring_attention_backward", _ring_backward_composite,
                 "CompositeImplicitAutograd")


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: Any, *,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's query chunks over every rank's keys and values.

    ``query``, ``key``, ``value``: ``(batch, heads, local length, head_dim)``, this rank's two
    chunks of each sequence (head and tail) concatenated; under grouped-query attention the
    keys and values have fewer heads, a divisor of the query's, and go around the ring as they
    are (repeated per block, for the kernel); ``group``: the context-parallel process group.
    Returns this rank's chunks of the attention output, as whole-sequence causal SDPA gives
    them.
    """
    if query.device.type == "cuda":
        raise NotImplementedError(
            "fxtrain's ring attention runs the CPU's SDPA kernel; on CUDA, torch's own "
            "context_parallel() rings its flash and efficient kernels, which fxtrain has not "
            "been measured with yet")
    if not _ring._cp_options.enable_load_balance:
        raise RuntimeError(
            "fxtrain's ring attention takes each rank's head and tail chunks (torch's load "
            "balance), but torch's _cp_options.enable_load_balance was set False in this "
            "process; set it back to True")
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError(f"ring_attention: the query has {query.shape[1]} heads, the keys "
                         f"{key.shape[1]} and the values {value.shape[1]}; the keys' and values' "
                         "heads must be equal and divide the query's")
    require("context parallelism (ring attention)", 2, 13)
    return _ring_forward(query, key.contiguous(), value.contiguous(), group.group_name,
                         scale)[0]

