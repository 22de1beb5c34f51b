"""Tensor parallelism on the functional state: a plan in torch's vocabulary placed on the
state's parameters as DTensors, the step running them through ``functional_call``.

``fx.shard(state, tp_plan=...)`` (see ``fxtrain.distributed``) applies torch's
``parallelize_module`` to the state's weightless skeleton: each planned ``nn.Linear`` or
``nn.Embedding`` gets the plan's input and output hooks (``ColwiseParallel`` splits its output
features across the ranks, ``RowwiseParallel`` its input features and all-reduces its output),
and its parameters the plan's placements, which the state's own parameters then take
(``distribute_tensor``: each rank keeps its slice). Parameters outside the plan stay whole on
every rank. The forward runs the DTensors as they are (no gather), the backward gives each
gradient in its parameter's placement, and the optimizer runs on the slices; the ranks of the
group train on the same batch (``fx.distributed.data_world_size()`` counts the replicas of the
model, which share the global batch).

Plans name submodules, with ``*`` for any index as transformers' plans do
(``"model.layers.*.mlp.up_proj"``), and take torch's styles or transformers' names for them
(``_plans.py``), sequence parallelism's included: ``SequenceParallel`` runs a norm on
activations split along the sequence, its parameters replicated (their gradients, each rank's
part, are summed by the step: ``_strategies.TensorParallel``), and ``PrepareModuleInput``/
``PrepareModuleOutput`` lay out a block's inputs and outputs. ``tp_plan="auto"`` takes a
transformers model's own ``config.base_model_tp_plan``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ._plans import plan_of
from ._split_checks import checked

__all__ = ["plan_of", "placed_on", "planned_params"]


def placed_on(module: nn.Module, plan: dict[str, Any], mesh: Any,
              params: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, tuple]]:
    """A copy of the skeleton ``module`` running ``plan`` on the 1-D ``mesh``, and the
    placements the plan gives each of its parameters (by name), the frozen ones too."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    module = copy.deepcopy(module)  # a skeleton: meta tensors, nothing to copy
    kept = {id(p): name for name, p in module.named_parameters()}  # each tensor's kept name
    for name in plan:
        for local, p in module.get_submodule(name).named_parameters():
            if kept.get(id(p)) != f"{name}.{local}":
                raise ValueError(f"fx.shard: the tensor-parallel plan splits {name!r}, whose "
                                 f"{local} is tied to {kept.get(id(p))!r}; leave tied weights "
                                 "out of the plan")
    parallelize_module(module, mesh, plan)
    checked(module, plan, mesh.size())
    placed = {n: tuple(p.placements) for n, p in module.named_parameters()
              if isinstance(p, DTensor)}
    from torch.distributed.tensor import Shard
    for n, p in module.named_parameters():
        split = [x.dim for x in placed.get(n, ()) if isinstance(x, Shard)]
        if split and p.shape[split[0]] % mesh.size():
            raise ValueError(f"fx.shard: the tensor-parallel plan splits {n!r} (shape "
                             f"{tuple(p.shape)}) along dimension {split[0]} over {mesh.size()} "
                             f"ranks, which does not divide its {p.shape[split[0]]}: torch's "
                             "styles split evenly only (their next layer rebuilds the whole "
                             "size from its shard); give that layer a size the ranks divide, "
                             "or leave it out of the plan")
    return module, placed


def planned_params(layers: Any, names: Any) -> frozenset[str]:
    """Those of the parameter ``names`` that belong to one of the plan's ``layers``."""
    layers = set(layers)
    return frozenset(n for n in names if n.rpartition(".")[0] in layers)
