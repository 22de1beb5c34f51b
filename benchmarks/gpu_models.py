"""The GPU kit's models (``gpu_transformer.py --model``), each seeded and built on its device,
each a module whose ``forward(ids, head=True)`` returns the logits, or with ``head=False`` the
final hidden states (the LM head's input, after the final norm):

  nano   GPT-2 124M written plainly (``nanogpt.GPT``)
  hf     transformers' ``GPT2LMHeadModel(GPT2Config())``, SDPA attention (in ``CausalLM``)
  llama  transformers' ``LlamaForCausalLM`` from a config of Llama-3.2-1B's shape (in
         ``CausalLM``): width 2048, 16 layers, 32 heads of 64, 8 key-value heads (grouped-query
         attention), SwiGLU MLP of 8192, RMSNorm (eps 1e-5), RoPE (theta 500000, without
         Llama 3.1's frequency scaling, which changes no FLOP), vocabulary 128256, the embedding
         tied to the LM head as Llama-3.2-1B's is: 1,235,814,400 parameters. No weights are
         downloaded: random init.

``--tiny`` shrinks each to a CPU size (2 blocks of width 64, vocabulary 256). ``LossInside``
wraps a model into the module a nanoGPT-style loop compiles: its forward computes and returns
the loss, so the loss runs inside the compiled graph.
"""

from __future__ import annotations

import torch
from torch import nn

from nanogpt import Shape, lm_loss

MODELS = ("nano", "hf", "llama")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def gpt2_shape(args) -> Shape:
    if args.tiny:
        return Shape(layers=2, heads=2, width=64, vocab=256, positions=args.seq,
                     dropout=args.dropout[0])
    return Shape(positions=max(args.seq, 1024), dropout=args.dropout[0])


def vocab(args) -> int:
    return (LLAMA_TINY if args.tiny else LLAMA_1B)["vocab_size"] if args.model == "llama" \
        else gpt2_shape(args).vocab


def model_of(args) -> nn.Module:
    """``args.model``, seeded (the same initial weights in every variant's process), built
    directly on ``args.device``."""
    torch.manual_seed(0)
    with torch.device(args.device):
        if args.model == "nano":
            from nanogpt import GPT
            return GPT(gpt2_shape(args))
        return CausalLM(transformers_model(args))


def transformers_model(args) -> nn.Module:
    import transformers
    if args.model == "llama":
        config = transformers.LlamaConfig(
            **(LLAMA_TINY if args.tiny else LLAMA_1B), max_position_embeddings=args.seq,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=True, attention_dropout=args.dropout[0], use_cache=False,
            attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(config)
    s = gpt2_shape(args)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=s.layers, n_head=s.heads, n_embd=s.width, vocab_size=s.vocab,
        n_positions=s.positions, attn_implementation="sdpa", resid_pdrop=s.dropout,
        embd_pdrop=s.dropout, attn_pdrop=s.dropout, use_cache=False))


class CausalLM(nn.Module):
    """A transformers causal LM as ``forward(ids, head=True)``: its logits, or (``head=False``)
    its base model's last hidden state (after the final norm: the head's input)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids, head: bool = True):
        if head:
            return self.lm(input_ids=ids, use_cache=False).logits
        return self.lm.base_model(input_ids=ids, use_cache=False).last_hidden_state


class LossInside(nn.Module):
    """``forward(ids) -> loss``: the next-token loss computed inside the module, as nanoGPT's
    ``GPT.forward(idx, targets)`` computes ``F.cross_entropy`` of its logits (in autocast's
    dtype, the loss itself in float32) after its LM head. ``torch.compile`` of this module puts
    the loss in the compiled graph, where Inductor fuses it. Only the loss is returned (as
    modded-nanogpt's forward does): nanoGPT's also returns the logits, which keeps them alive
    as an output of the compiled graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return lm_loss(self.model(ids), ids)


def head_weight(model: nn.Module) -> str:
    """The name, in ``model.named_parameters()``, of the LM head's weight (for a tied head, the
    embedding's: the name a TrainState keeps)."""
    head = model.lm.get_output_embeddings() if isinstance(model, CausalLM) else model.lm_head
    return next(name for name, p in model.named_parameters() if p is head.weight)


def use_remat(model: nn.Module, remat) -> None:
    """Every block through ``remat`` (fx.remat) in the backward: nanogpt's ``block_call``, or
    transformers' checkpointing hook on each of its layers."""
    if not isinstance(model, CausalLM):
        model.block_call = remat
        return
    from transformers.modeling_layers import GradientCheckpointingLayer
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):  # calls this hook on each forward
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = remat


def flops_per_token(model: nn.Module, args) -> float:
    """Training FLOPs a token: 6 x the parameters that multiply (every parameter but a lookup
    table's) + 12 L H Dh T for attention's scores and weighted values (L layers of H heads of
    Dh, sequence T; causal masking not subtracted).

    It is nanoGPT's count (6 N + 12 L d T, N without the position table) and torchtitan's
    (``get_nparams_and_flops``: 6 x the parameters less the ``nn.Embedding`` tables' + 12 l h q
    t, attention's FLOPs counted as the forward's two products and the backward's four, flash
    attention's recomputation not). torchtitan's Llama unties its head; tied here (GPT-2's and
    Llama-3.2-1B's head is the token table), the table is the head's weight, a product, and it
    counts once, as nanoGPT counts GPT-2's."""
    head = dict(model.named_parameters())[head_weight(model)]
    lookups = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, nn.Embedding) and m.weight is not head)
    n = sum(p.numel() for p in model.parameters()) - lookups
    layers, heads, head_dim = _attention_shape(model, args)
    return 6 * n + 12 * layers * heads * head_dim * args.seq


def _attention_shape(model: nn.Module, args) -> tuple[int, int, int]:
    if not isinstance(model, CausalLM):
        s = gpt2_shape(args)
        return s.layers, s.heads, s.width // s.heads
    c = model.lm.config
    return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads
