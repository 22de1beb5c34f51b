"""Context parallelism on every torch of the range, in one process (issue 79): what it refuses
by name before it runs (torch before 2.13, a CUDA tensor) and, where it runs, the ring of one
rank giving what whole-sequence causal attention gives. The rank tests
(tests/ranks/test_context_parallel_ranks.py) are strict xfails before 2.13; these assert the
refusal's own message there, on .ci/run's torch 2.11 leg (this file imports fxtrain._torch)."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fxtrain as fx
from fxtrain._torch.context_parallel import ring_attention
from fxtrain._torch.version import UnsupportedTorchError, at_least
from helpers import extra

pytestmark = pytest.mark.usefixtures("one_rank")


def _refused(feature):
    """The refusal of ``feature`` on this torch, as ``fxtrain._torch.version.require`` words it."""
    return pytest.raises(UnsupportedTorchError, match=re.escape(
        f"{feature} needs torch 2.13 or later; this process has torch {torch.__version__}"))


def test_the_ring_of_one_rank_is_causal_attention_or_refused_before_torch_2_13():
    """On one rank the ring is one block, the SDPA kernel on the whole sequence (rank 0 of 1
    holds chunks 0 and 1, in order): its output and gradients are causal SDPA's, bit for bit
    (the same CPU kernel on the same tensors; the merge of one block rescales by exp(0))."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, requires_grad=True) for _ in range(3))
    group = torch.distributed.group.WORLD
    if not at_least(2, 13):
        with _refused("context parallelism (ring attention)"):
            ring_attention(q, k, v, group)
        return
    out = ring_attention(q, k, v, group)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(map(torch.equal, grads, torch.autograd.grad(ref.square().sum(), (q, k, v))))


def test_fx_shard_with_a_context_refuses_torch_before_2_13_or_trains_on_one_rank():
    """``fx.shard(context=...)`` on a (dp, cp) mesh of one rank: refused at fx.shard before
    torch 2.13, naming the feature and this torch; from 2.13 its step's loss is the model's
    own on the whole batch."""
    transformers = extra("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, use_cache=False,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    mesh = fx.sharding.mesh((1, 1), ("dp", "cp"))
    if not at_least(2, 13):
        with _refused("context parallelism (its ring and its gathered attention)"):
            fx.shard(state, mesh, context="cp")
        return
    sharded = fx.shard(state, mesh, context="cp")
    assert (sharded.layout.context.dim, sharded.layout.context.size) == ("cp", 1)

    def loss(s, p, batch):
        out = s.apply(p, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        return fx.losses.causal_lm(out.logits, batch["shift_labels"], shift=False)

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    _, metrics = fx.make_train_step(loss)(sharded, {"input_ids": ids, "labels": ids})
    with torch.no_grad():
        whole = fx.losses.causal_lm(model(ids).logits, ids)
    # float32 both, through other code (the ring and its merge, transformers' SDPA call): a
    # mean of 30 cross-entropies of about 4.2, each a few float32 epsilons (1.2e-7) off through
    # one block at most; 1e-5 relative holds with room (seen: equal on torch 2.13 and 2.15, the
    # same CPU kernel), a ring that forgets the causal mask moved it 2.3e-3
    assert metrics["loss"] == pytest.approx(float(whole.total / whole.count), rel=1e-5)


def test_a_cuda_tensor_is_refused_by_name_on_a_machine_without_one():
    """The ring runs the CPU's kernel; CUDA's is torch's context_parallel()'s. A fake CUDA
    tensor (FakeTensorMode makes one without a GPU) takes that branch on any machine, before
    the torch check, so on every torch."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 4, 8, 16, device="cuda")
        assert q.device.type == "cuda"
        with pytest.raises(NotImplementedError, match=re.escape(
                "fxtrain's ring attention runs the CPU's SDPA kernel; on CUDA, torch's own "
                "context_parallel() rings its flash and efficient kernels")):
            ring_attention(q, q, q, torch.distributed.group.WORLD)


def test_both_wirings_refuse_a_cuda_tensor_by_name():
    """The attention function transformers calls refuses CUDA for both wirings: the ring's and
    packed documents' gathered keys (whose SDPA with a mask and grouped keys has not run on a
    GPU), before either runs."""
    from types import SimpleNamespace

    from fxtrain.distributed import _context_attention
    from fxtrain.distributed._layout import Context
    layer = SimpleNamespace(is_causal=True, fxtrain_context=Context(
        dim="cp", size=1, rank=0, group=torch.distributed.group.WORLD))
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 4, 8, 16, device="cuda")
        mask = torch.ones(1, 8, 8, dtype=torch.bool, device="cuda")
        for extra_kwargs in ({}, {"document_mask": mask}):
            with pytest.raises(NotImplementedError, match=re.escape(
                    "context parallelism's attention (the ring, and the gathered keys of "
                    "packed documents) runs the CPU's SDPA kernel; on CUDA")):
                _context_attention.attention(layer, q, q, q, None, **extra_kwargs)
