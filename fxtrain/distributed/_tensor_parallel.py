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
(``"model.layers.*.mlp.up_proj"``), and take ``ColwiseParallel()``/``RowwiseParallel()`` (or
any ``ParallelStyle``) or the strings ``"colwise"``/``"rowwise"``; ``tp_plan="auto"`` takes a
transformers model's own ``config.base_model_tp_plan``.
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

import torch
from torch import nn

def _style(value: Any, name: str) -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
    if isinstance(value, ParallelStyle):
        return value
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    if value in styles:
        return styles[value]()
    raise ValueError(f"fx.shard: the tensor-parallel plan gives {name!r} {value!r}; use "
                     "'colwise', 'rowwise' or a torch ParallelStyle (ColwiseParallel(), "
                     "RowwiseParallel(), ...)")


def plan_of(module: nn.Module, tp_plan: Any) -> dict[str, Any]:
    """``{submodule name: ParallelStyle}`` of ``tp_plan`` on ``module``: ``"auto"`` (the
    transformers model's ``config.base_model_tp_plan``, under its base model's prefix), or a
    dict whose keys may hold ``*`` for an index. Every key must name at least one submodule, an
    ``nn.Linear`` or ``nn.Embedding`` (what torch's styles split)."""
    if isinstance(tp_plan, str):
        if tp_plan != "auto":
            raise ValueError(f"fx.shard: tp_plan must be 'auto' or a dict {{submodule: style}}, "
                             f"got {tp_plan!r}")
        base = getattr(getattr(module, "config", None), "base_model_tp_plan", None)
        if not base:
            raise ValueError(f"fx.shard(tp_plan='auto'): {type(module).__name__} has no "
                             "config.base_model_tp_plan (transformers gives one to Llama, "
                             "Qwen, Mistral and others); pass the plan as a dict")
        prefix = getattr(module, "base_model_prefix", "")
        prefix = f"{prefix}." if prefix and hasattr(module, prefix) else ""
        tp_plan = {prefix + key: value for key, value in base.items()}
    if not isinstance(tp_plan, dict) or not tp_plan:
        raise TypeError(f"fx.shard: tp_plan must be 'auto' or a non-empty dict {{submodule: "
                        f"style}}, got {type(tp_plan).__name__}")
    modules = dict(module.named_modules())
    out: dict[str, Any] = {}
    for key, value in tp_plan.items():
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+"))
        found = [name for name in modules if name and pattern.fullmatch(name)]
        if not found:
            close = difflib.get_close_matches(key, [n for n in modules if n], n=3)
            raise ValueError(f"fx.shard: the tensor-parallel plan names {key!r}, which is no "
                             f"submodule of {type(module).__name__}"
                             + (f"; did you mean {', '.join(map(repr, close))}?" if close
                                else ""))
        for name in found:
            if type(value).__name__ == "SequenceParallel":
                raise ValueError(f"fx.shard: the tensor-parallel plan gives {key!r} "
                                 "SequenceParallel; sequence parallelism (activations split "
                                 "along the sequence between the split layers) is not "
                                 "supported yet: leave the norms out of the plan, their "
                                 "activations whole on every rank")
            if not isinstance(modules[name], nn.Linear | nn.Embedding):
                raise ValueError(f"fx.shard: the tensor-parallel plan splits {name!r}, a "
                                 f"{type(modules[name]).__name__}; torch's styles split "
                                 "nn.Linear and nn.Embedding")
            out[name] = _style(value, key)
    _check_rowwise_inputs(modules, out)
    return out


def _check_rowwise_inputs(modules: dict[str, nn.Module], plan: dict[str, Any]) -> None:
    """Refuses a rowwise ``nn.Linear`` that takes its input split along its features (torch's
    default, ``Shard(-1)``) with no colwise layer before it (in the model's order, since the
    last rowwise one) to split that input: the data's whole tensor would be read as one rank's
    slice of a wider one, and the first step fail inside torch."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    split = False  # the activations are split along their features here
    for name in (n for n in modules if n in plan):
        style = plan[name]
        if isinstance(style, ColwiseParallel):
            split = True
        elif isinstance(style, RowwiseParallel) and isinstance(modules[name], nn.Linear):
            if isinstance(style.input_layouts[0], Shard) and not split:
                raise ValueError(
                    f"fx.shard: the tensor-parallel plan splits {name!r} rowwise, but no colwise "
                    "layer before it splits its input: RowwiseParallel takes its input split "
                    "along its features (what a colwise layer gives), and the whole input would "
                    "be read as one rank's slice; plan a colwise layer before it, or give "
                    f"{name!r}: RowwiseParallel(input_layouts=Replicate())")
            split = False


def install(module: nn.Module, plan: dict[str, Any], mesh: Any,
            params: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the skeleton ``module`` running ``plan`` on ``mesh``, and ``params`` with the
    planned ones distributed as the plan places them (the others as they are)."""
    from torch.distributed.tensor import distribute_tensor
    module, placed = placed_on(module, plan, mesh, params)
    return module, {n: distribute_tensor(p, mesh, placed[n]) if n in placed else p
                    for n, p in params.items()}


def placed_on(module: nn.Module, plan: dict[str, Any], mesh: Any,
              params: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, tuple]]:
    """A copy of the skeleton ``module`` running ``plan`` on the 1-D ``mesh``, and the
    placements the plan gives each of its parameters (by name)."""
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
    frozen = sorted(set(placed) - set(params))
    if frozen:
        raise ValueError(f"fx.shard: the tensor-parallel plan splits frozen parameters "
                         f"({frozen[:3]}); leave modules without trainable weights out of it")
    return module, placed


def planned_params(layers: Any, names: Any) -> frozenset[str]:
    """Those of the parameter ``names`` that belong to one of the plan's ``layers``."""
    layers = set(layers)
    return frozenset(n for n in names if n.rpartition(".")[0] in layers)
