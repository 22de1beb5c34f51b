"""Tensor parallelism (``fx.shard(state, tp_plan=...)``) on 2 gloo ranks: a tiny Llama with its
own plan trains as one process does, each rank holding its slices of the planned layers, and
its checkpoint restores onto one process. Plans that name what the model lacks are refused."""

import pytest

import dist_worker
import fxtrain as fx
from helpers import extra

transformers = extra("transformers")


def test_plans_that_name_what_the_model_lacks_are_refused():
    from fxtrain.distributed import plan_of
    model = dist_worker.tiny_llama()
    plan = plan_of(model, "auto")
    assert plan["model.layers.3.self_attn.q_proj"].__class__.__name__ == "ColwiseParallel"
    assert plan["model.layers.0.mlp.down_proj"].__class__.__name__ == "RowwiseParallel"
    with pytest.raises(ValueError, match="names 'model.layers.*.mlp.upp_proj', which is no "
                                         "submodule of LlamaForCausalLM"):
        plan_of(model, {"model.layers.*.mlp.upp_proj": "colwise"})
    with pytest.raises(ValueError, match="splits 'model.norm', a LlamaRMSNorm; .*"
                                         "SequenceParallel"):
        plan_of(model, {"model.norm": "colwise"})
    with pytest.raises(ValueError, match="use a torch ParallelStyle .* or one of 'colwise', "
                                         "'rowwise'"):
        plan_of(model, {"model.layers.0.mlp.up_proj": "sideways"})
    with pytest.raises(ValueError, match="names 'model.layers.0.mlp.up_proj' twice "
                                         r"\('model.layers.\*.mlp.up_proj' and "):
        plan_of(model, {"model.layers.*.mlp.up_proj": "colwise",
                        "model.layers.0.mlp.up_proj": "colwise"})
    with pytest.raises(ValueError, match="has no config.base_model_tp_plan"):
        plan_of(dist_worker.tiny_gpt2(), "auto")


def test_a_rowwise_layer_with_no_colwise_layer_before_it_is_refused():
    """Issue 60, hole 9: {'0': 'rowwise'} on a first layer was accepted by fx.shard and failed
    at the first step inside torch: RowwiseParallel takes its input split along its features
    (Shard(-1), what a colwise layer before it gives), and the data's whole tensor was read as
    one rank's slice of a wider one."""
    from torch import nn
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel

    from fxtrain.distributed import plan_of
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for plan in ({"0": "rowwise"}, {"2": "rowwise"}, {"0": "rowwise", "2": "colwise"}):
        first = min(plan)
        with pytest.raises(ValueError, match=f"splits '{first}' rowwise, but no colwise layer "
                                             f"before it splits its input.*'{first}': "
                                             "RowwiseParallel\\(input_layouts=Replicate\\(\\)\\)"):
            plan_of(model, plan)
    assert set(plan_of(model, {"0": "colwise", "2": "rowwise"})) == {"0", "2"}
    whole = {"0": RowwiseParallel(input_layouts=Replicate())}
    assert set(plan_of(model, whole)) == {"0"}
    assert len(plan_of(dist_worker.tiny_llama(), "auto")) > 0


def test_a_sequence_parallel_plan_and_transformers_own_plan_resolve():
    """Issue 61: SequenceParallel on the norms, PrepareModuleInput on the blocks that take the
    sequence whole and a head left split along the vocabulary resolve (any module for those
    styles), in the model's order; transformers' style names (a model's own ``_tp_plan``,
    its LM head "colwise_gather_output", its embedding "embedding_rowwise") are torch's
    styles."""
    import sp_worker
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)

    from fxtrain.distributed import plan_of
    model = dist_worker.tiny_llama()
    plan = plan_of(model, sp_worker.llama_plan())
    assert isinstance(plan["model.layers.2.input_layernorm"], SequenceParallel)
    assert isinstance(plan["model.layers.0"], PrepareModuleInput)
    assert isinstance(plan["model.layers.3.mlp"], PrepareModuleInput)
    assert plan["lm_head"].output_layouts == (Shard(-1),)
    assert list(plan) == [n for n, _ in model.named_modules() if n in plan]
    assert len(plan) == 1 + 4 * 11 + 2
    own = plan_of(model, model._tp_plan)
    assert isinstance(own["lm_head"], ColwiseParallel)
    assert own["lm_head"].output_layouts == (Replicate(),)
    assert isinstance(own["model.embed_tokens"], RowwiseParallel)
    assert own["model.embed_tokens"].input_layouts == (Replicate(),)
    split = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    assert isinstance(plan_of(model, {"model.embed_tokens": split, "model.norm":
                                      "sequence_parallel"})["model.norm"], SequenceParallel)


def test_a_plan_splits_a_lora_layer_by_the_name_of_the_layer_it_wraps():
    """peft's LoRA layer under transformers' plan: the frozen base takes the style, and so does
    the adapter on the split side (lora_B of a colwise layer, lora_A of a rowwise one); LoRA on
    an embedding the plan splits is refused by name."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from fxtrain.distributed import plan_of
    peft = extra("peft")
    model = peft.get_peft_model(dist_worker.tiny_llama(), peft.LoraConfig(
        r=2, target_modules=["q_proj", "o_proj"], lora_dropout=0.0))
    plan = plan_of(model, "auto")
    block = "base_model.model.model.layers.0.self_attn"
    assert isinstance(plan[f"{block}.q_proj.base_layer"], ColwiseParallel)
    assert isinstance(plan[f"{block}.q_proj.lora_B.default"], ColwiseParallel)
    assert isinstance(plan[f"{block}.o_proj.base_layer"], RowwiseParallel)
    assert isinstance(plan[f"{block}.o_proj.lora_A.default"], RowwiseParallel)
    assert f"{block}.k_proj" in plan  # not wrapped: as without peft
    assert not any(k.endswith((".q_proj.lora_A.default", ".o_proj.lora_B.default", ".q_proj",
                               ".o_proj")) for k in plan)
    embedded = peft.get_peft_model(dist_worker.tiny_llama(), peft.LoraConfig(
        r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="splits 'base_model.model.model.embed_tokens', LoRA "
                                         "on Embedding"):
        plan_of(embedded, {"base_model.model.model.embed_tokens": "embedding_rowwise"})


@pytest.mark.parametrize("layer,kind", [("o_proj", "rowwise"), ("q_proj", "colwise")])
def test_a_plan_that_splits_the_sequence_at_a_lora_layer_is_refused(layer, kind):
    """The sequence-parallel plan splits the sequence where a block ends (a rowwise layer's
    output) and gathers it where one starts (a colwise layer's input). At a LoRA layer the
    adapter off the style would run on one rank's slice: refused by name (before, the ranks'
    adapters drifted apart silently)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from fxtrain.distributed import plan_of
    peft = extra("peft")
    model = peft.get_peft_model(dist_worker.tiny_llama(), peft.LoraConfig(
        r=2, target_modules=[layer], lora_dropout=0.0))
    style = (RowwiseParallel(output_layouts=Shard(1)) if kind == "rowwise"
             else ColwiseParallel(input_layouts=Shard(1)))
    name = f"base_model.model.model.layers.*.self_attn.{layer}"
    with pytest.raises(ValueError, match=rf"splits the sequence at the LoRA layer "
                                         rf"'{name.replace('*', '0')}' .*Shard\(dim=1\)"):
        plan_of(model, {name: style})
