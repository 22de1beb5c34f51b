"""Tensor parallelism (``fx.shard(state, tp_plan=...)``) on 2 gloo ranks: a tiny Llama with its
own plan trains as one process does, each rank holding its slices of the planned layers, and
its checkpoint restores onto one process. Plans that name what the model lacks are refused."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain as fx
from helpers import extra
from test_distributed import free_port

transformers = extra("transformers")


def spawn(tmp_path, **kwargs):
    mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), "tensor_parallel",
                                                   (str(tmp_path),), kwargs))
    return [torch.load(tmp_path / f"tp_rank{r}.pt") for r in (0, 1)]


def test_plans_that_name_what_the_model_lacks_are_refused():
    from fxtrain.distributed import plan_of
    model = dist_worker.tiny_llama()
    plan = plan_of(model, "auto")
    assert plan["model.layers.3.self_attn.q_proj"].__class__.__name__ == "ColwiseParallel"
    assert plan["model.layers.0.mlp.down_proj"].__class__.__name__ == "RowwiseParallel"
    with pytest.raises(ValueError, match="names 'model.layers.*.mlp.upp_proj', which is no "
                                         "submodule of LlamaForCausalLM"):
        plan_of(model, {"model.layers.*.mlp.upp_proj": "colwise"})
    with pytest.raises(ValueError, match="splits 'model.norm', a LlamaRMSNorm"):
        plan_of(model, {"model.norm": "colwise"})
    from torch.distributed.tensor.parallel import SequenceParallel
    with pytest.raises(ValueError, match="SequenceParallel; sequence parallelism .* is not "
                                         "supported yet"):
        plan_of(model, {"model.layers.*.input_layernorm": SequenceParallel()})
    with pytest.raises(ValueError, match="use 'colwise', 'rowwise' or a torch ParallelStyle"):
        plan_of(model, {"model.layers.0.mlp.up_proj": "sideways"})
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
