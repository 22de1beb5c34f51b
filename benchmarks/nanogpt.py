"""A GPT-2 of the shape of ``transformers.GPT2Config()`` written plainly, as a nanoGPT-style
training script would: pre-norm blocks, fused QKV projection, ``F.scaled_dot_product_attention``
with ``is_causal=True``, tanh-GELU MLP, the token embedding tied to the LM head. Its forward
returns the logits (or, ``head=False``, the final hidden states, for a loss that applies the
head itself); ``WithLoss`` wraps it for trainers that want ``loss`` from ``labels``.

It exists so that ``gpu_transformer.py``'s baseline is not Hugging Face's module: the same
parameter count and FLOPs (124M at width 768, 12 blocks, 12 heads, 50257 tokens, 1024
positions), none of transformers' dispatch, masks or caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    layers: int = 12
    heads: int = 12
    width: int = 768
    vocab: int = 50257
    positions: int = 1024
    dropout: float = 0.0


class Attention(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.heads, self.dropout = shape.heads, shape.dropout
        self.qkv = nn.Linear(shape.width, 3 * shape.width)
        self.proj = nn.Linear(shape.width, shape.width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(shape.width), nn.LayerNorm(shape.width)
        self.attn = Attention(shape)
        self.fc = nn.Linear(shape.width, 4 * shape.width)
        self.out = nn.Linear(4 * shape.width, shape.width)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh")))


class GPT(nn.Module):
    """``forward(ids) -> logits``, or with ``head=False`` the hidden states after the final
    layer norm (the head's input; its weight is ``wte.weight``, tied); ``block_call(block, h)``
    runs each block (``fx.remat`` there recomputes a block's activations in the backward)."""

    def __init__(self, shape: Shape = Shape()):
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.width)
        self.wpe = nn.Embedding(shape.positions, shape.width)
        self.drop = nn.Dropout(shape.dropout)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.width)
        self.lm_head = nn.Linear(shape.width, shape.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2's
        self.block_call: Callable = lambda block, h: block(h)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual writes
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.layers))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids, head: bool = True):
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.drop(self.wte(ids) + self.wpe(positions))
        for block in self.h:
            h = self.block_call(block, h)
        h = self.ln_f(h)
        return self.lm_head(h) if head else h


def lm_loss(logits, ids):
    """Next-token cross-entropy in float32, every position but the last."""
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class WithLoss(nn.Module):
    """``forward(input_ids, labels) -> {"loss": ...}``: the module as ``transformers.Trainer``
    calls a model (the parameters keep their names under ``model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None):
        logits = self.model(input_ids)
        return {"loss": lm_loss(logits, labels), "logits": logits}
