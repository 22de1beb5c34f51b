"""A transformers model's attention as context parallelism's ring (``fx.shard(context=...)``).

``prepared(module, context)`` is a copy of the model whose attention implementation is
``"fxtrain_context"``: each attention layer calls ``attention`` below, which runs causal
attention of this rank's slice of the sequence over every rank's keys and values
(``fxtrain._torch.context_parallel.ring_attention``, over ``Context.group``, which the copy's
attention layers hold as an attribute: what the layer computes with is on the module the step
runs, as a tensor-parallel plan's hooks are). The implementation is registered with
transformers' ``AttentionInterface`` once, as a static function; transformers builds no mask
for an implementation without a mask function, so the ring's causal rule is the only mask.

Packed documents (a batch's own ``position_ids``: ``fxtrain.distributed._context.sliced``
adds ``document_mask``, made once per step, which the model passes down to this function) run
another wiring, Llama 3's context parallelism for document masks: every rank's keys and values
are gathered (``fxtrain._torch.collectives.all_gather_autograd``; the backward reduce-scatters
their gradients) and this rank's queries attend over them under that mask ("same document, not
after me"), one SDPA call, the keys' heads grouped by SDPA (``enable_gqa``), not repeated. It
holds one layer's whole-sequence keys and values at a time and the one boolean mask of
``local length x length`` per row that every layer shares, where the ring holds two chunks'
at a time: the price of masks the ring's fixed causal blocks do not express.

What neither can run is refused by name when the step runs it: a mask given to the layer
(padding), attention dropout, a sliding window, soft-capping, attention sinks, and attention
that is not causal self-attention.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._torch.collectives import all_gather_autograd
from .._torch.context_parallel import ring_attention
from .._torch.modes import outside_dispatch_modes
from .._torch.traced_errors import fail

NAME = "fxtrain_context"
_ATTRIBUTE = "fxtrain_context"


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query``, ``key``, ``value`` ``(batch, heads,
    local length, head_dim)`` (keys with fewer heads under grouped-query attention, passed
    around the ring unrepeated); returns ``(batch, local length, heads, head_dim)`` and no
    weights."""
    context = getattr(module, _ATTRIBUTE, None)
    if context is None:
        fail(ValueError, f"the attention implementation {NAME!r} runs a model fx.shard("
                         "context=...) prepared; this layer was not")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    refused = [why for why, present in (
        ("an attention mask (pad with labels -100 and no attention_mask instead; give "
         "packed documents as position_ids restarting at each)", attention_mask is not None),
        ("attention dropout (set the config's attention dropout to 0)", bool(dropout)),
        ("a sliding window", kwargs.get("sliding_window") is not None),
        ("soft-capping", kwargs.get("softcap") is not None),
        ("attention sinks", kwargs.get("s_aux") is not None),
        ("attention that is not causal self-attention", not causal
         or query.shape[2] != key.shape[2]),
    ) if present]
    if refused:
        fail(ValueError, f"context parallelism runs causal attention as a ring over the "
                         f"ranks; {type(module).__name__} asks for {', '.join(refused)}, "
                         "which the ring cannot shard")
    if query.device.type == "cuda":
        raise NotImplementedError(
            "context parallelism's attention (the ring, and the gathered keys of packed "
            "documents) runs the CPU's SDPA kernel; on CUDA, torch's own context_parallel() "
            "rings its flash and efficient kernels, which fxtrain has not been measured with yet")
    mask = kwargs.get("document_mask")
    if mask is not None:  # its SDPA takes the keyed stream's key, as one process's does
        out = _documents_attention(query, key, value, mask, context, scaling)
    else:
        out = ring_attention(query, key, value, context.group, scale=scaling)
        # In a step, F.scaled_dot_product_attention takes one key of the keyed stream (for its
        # dropout, drawn or not); a dropout of probability 0 takes it here, so that the
        # dropouts after this layer draw with the keys one process's draw with
        # (fxtrain.random.keyed)
        out = F.dropout(out, 0.0, module.training)
    return out.transpose(1, 2).contiguous(), None


def _documents_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor, context: Any,
                         scale: float | None) -> torch.Tensor:
    """This rank's queries over every rank's keys and values, under ``mask`` ``(batch, local
    length, length)``, the keys in the gathered order (``_context.document_mask``)."""
    length = query.shape[2] * context.size
    if mask.shape != (query.shape[0], query.shape[2], length) or mask.dtype != torch.bool:
        fail(ValueError, f"context parallelism: document_mask is {tuple(mask.shape)} "
                         f"{mask.dtype}; the attention's is ({query.shape[0]}, {query.shape[2]}, "
                         f"{length}) torch.bool (batch, this rank's length, whole length): pass "
                         "the batch's document_mask as fx.shard(context=...) made it")
    key, value = (all_gather_autograd(t, 2, context.group) for t in (key, value))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None],
                                          scale=scale, enable_gqa=key.shape[1] != query.shape[1])


def prepared(module: nn.Module, context: Any) -> nn.Module:
    """A copy of the transformers model ``module`` (a skeleton: its tensors on the meta device,
    nothing to copy) whose attention layers run the ring over ``context``."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
    except ImportError:
        PreTrainedModel = None  # noqa: N806
    from .._torch.version import require
    require("context parallelism (its ring and its gathered attention)", 2, 13)
    if PreTrainedModel is None or not isinstance(module, PreTrainedModel):
        raise ValueError(f"fx.shard(context=...): context parallelism runs a transformers "
                         f"model's attention (its attention interface) as a ring; "
                         f"{type(module).__name__} is not a transformers PreTrainedModel, so "
                         "its attention is not one fxtrain can route")
    AttentionInterface.register(NAME, attention)
    with outside_dispatch_modes():  # a simulated rank's fake mode: the skeleton's meta tensors
        module = copy.deepcopy(module)
    module.set_attn_implementation(NAME)
    layers = [m for m in module.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]
    if not layers:
        raise ValueError(f"fx.shard(context=...): {type(module).__name__} has no attention "
                         "layer transformers' interface calls (a module with is_causal)")
    for layer in layers:
        setattr(layer, _ATTRIBUTE, context)
    return module
