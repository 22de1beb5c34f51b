"""A tensor-parallel plan read into torch's styles: ``plan_of(module, tp_plan)``.

A plan maps submodule names (``*`` for any index, as transformers' plans write them) to torch's
``ParallelStyle`` values or to the names transformers gives them:

- ``ColwiseParallel``/``RowwiseParallel`` split an ``nn.Linear`` or ``nn.Embedding``
  (``"colwise"``, ``"rowwise"``; ``"colwise_gather_output"``/``"colwise_rep"`` gather the
  output whole, ``"rowwise_split_input"``/``"rowwise_rep"`` take the input whole,
  ``"embedding_rowwise"`` splits an embedding's vocabulary);
- ``SequenceParallel`` (``"sequence_parallel"``, whose output is a plain tensor as
  transformers has it) runs any module, a norm or a dropout, on activations split along the
  sequence, its parameters whole on every rank;
- ``PrepareModuleInput``/``PrepareModuleOutput``/``PrepareModuleInputOutput`` lay out a module's
  inputs or outputs (the sequence split where it starts and ends), whatever the module.

A module is given one style: two keys that name one module are refused.

A layer peft's LoRA wraps (``base_layer``, ``lora_A``, ``lora_B``) is planned by the name of
the layer it wraps, as transformers' plans name it: its frozen ``base_layer`` takes the style,
and so does the adapter on the split side (``lora_B`` of a colwise layer, whose output is split
as the base's is; ``lora_A`` of a rowwise one, which reads the base's split input), the other
adapter whole on every rank.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from torch import nn

# transformers' names of torch's styles (``transformers.distributed.tensor_parallel``), as
# (style, its keyword arguments as layouts' names)
_NAMED = {
    "colwise": ("ColwiseParallel", {}),
    "rowwise": ("RowwiseParallel", {}),
    "colwise_gather_output": ("ColwiseParallel", {"output_layouts": "Replicate"}),
    "colwise_rep": ("ColwiseParallel", {"output_layouts": "Replicate"}),
    "rowwise_split_input": ("RowwiseParallel", {"input_layouts": "Replicate"}),
    "rowwise_rep": ("RowwiseParallel", {"input_layouts": "Replicate"}),
    "embedding_rowwise": ("RowwiseParallel", {"input_layouts": "Replicate"}),
    "sequence_parallel": ("SequenceParallel", {"use_local_output": True}),
}
_ANY_MODULE = ("SequenceParallel", "PrepareModuleInput", "PrepareModuleOutput",
               "PrepareModuleInputOutput")


def _style(value: Any, name: str) -> Any:
    import torch.distributed.tensor as dt
    import torch.distributed.tensor.parallel as tp
    if isinstance(value, tp.ParallelStyle):
        return value
    if isinstance(value, str) and value in _NAMED:
        style, kwargs = _NAMED[value]
        return getattr(tp, style)(**{k: getattr(dt, v)() if isinstance(v, str) else v
                                     for k, v in kwargs.items()})
    raise ValueError(f"fx.shard: the tensor-parallel plan gives {name!r} {value!r}; use a torch "
                     "ParallelStyle (ColwiseParallel(), RowwiseParallel(), SequenceParallel(), "
                     f"PrepareModuleInput(...), ...) or one of {', '.join(map(repr, _NAMED))}")


def _auto(module: nn.Module) -> dict[str, Any]:
    """``tp_plan="auto"``: the transformers model's ``config.base_model_tp_plan`` under its
    base model's prefix."""
    base = getattr(getattr(module, "config", None), "base_model_tp_plan", None)
    if not base:
        raise ValueError(f"fx.shard(tp_plan='auto'): {type(module).__name__} has no "
                         "config.base_model_tp_plan (transformers gives one to Llama, "
                         "Qwen, Mistral and others); pass the plan as a dict")
    wrapped = _peft_base(module)
    path = next(n + "." for n, m in module.named_modules() if m is wrapped) if wrapped else ""
    inner = wrapped or module
    prefix = getattr(inner, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and hasattr(inner, prefix) else ""
    return {path + prefix + key: value for key, value in base.items()}


def _peft_base(module: nn.Module) -> nn.Module | None:
    """The transformers model a peft model wraps (``base_model.model``), or None."""
    get = getattr(module, "get_base_model", None)
    return get() if callable(get) and isinstance(get(), nn.Module) else None


def plan_of(module: nn.Module, tp_plan: Any) -> dict[str, Any]:
    """``{submodule name: ParallelStyle}`` of ``tp_plan`` on ``module``: ``"auto"`` (the
    transformers model's ``config.base_model_tp_plan``, under its base model's prefix), or a
    dict whose keys may hold ``*`` for an index (a transformers model's own ``model._tp_plan``
    is one). Every key must name at least one submodule that its style can run (see the
    module), and no submodule may be named twice."""
    if isinstance(tp_plan, str):
        if tp_plan != "auto":
            raise ValueError(f"fx.shard: tp_plan must be 'auto' or a dict {{submodule: style}}, "
                             f"got {tp_plan!r}")
        tp_plan = _auto(module)
    if not isinstance(tp_plan, dict) or not tp_plan:
        raise TypeError(f"fx.shard: tp_plan must be 'auto' or a non-empty dict {{submodule: "
                        f"style}}, got {type(tp_plan).__name__}")
    modules = dict(module.named_modules())
    out: dict[str, Any] = {}
    named_by: dict[str, str] = {}
    for key, value in tp_plan.items():
        style = _style(value, key)
        for name in _matched(module, modules, key):
            if name in out:
                raise ValueError(f"fx.shard: the tensor-parallel plan names {name!r} twice "
                                 f"({named_by[name]!r} and {key!r}); give each submodule one "
                                 "style")
            _check_module(name, modules[name], style)
            out[name], named_by[name] = style, key
    out = {name: out[name] for name in modules if name in out}  # in the model's order
    _check_rowwise_inputs(modules, out)
    _check_sequence_split(out)
    return {part: s for name, style in out.items()
            for part, s in _through_lora(name, modules[name], style).items()}


def _lora_wrapped(module: nn.Module) -> nn.Module | None:
    """The layer a peft LoRA layer wraps (its ``base_layer``), or None for any other module."""
    if all(isinstance(getattr(module, a, None), nn.Module) for a in ("base_layer", "lora_A",
                                                                      "lora_B")):
        return module.base_layer
    return None


def _through_lora(name: str, module: nn.Module, style: Any) -> dict[str, Any]:
    """``{name: style}``, or for a LoRA layer split by ``style``: its base layer and the adapter
    on the split side."""
    from torch.distributed.tensor.parallel import ColwiseParallel
    if _lora_wrapped(module) is None or type(style).__name__ in _ANY_MODULE:
        return {name: style}
    side = "lora_B" if isinstance(style, ColwiseParallel) else "lora_A"
    adapters = getattr(module, side)
    return {f"{name}.base_layer": style,
            **{f"{name}.{side}.{a}": style for a in adapters}}


def _matched(module: nn.Module, modules: dict[str, nn.Module], key: str) -> list[str]:
    pattern = re.compile(re.escape(key).replace(r"\*", r"\d+"))
    found = [name for name in modules if name and pattern.fullmatch(name)]
    if not found:
        close = difflib.get_close_matches(key, [n for n in modules if n], n=3)
        raise ValueError(f"fx.shard: the tensor-parallel plan names {key!r}, which is no "
                         f"submodule of {type(module).__name__}"
                         + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
    return found


def _check_module(name: str, module: nn.Module, style: Any) -> None:
    """A style that splits weights runs on the layers torch's styles split; the sequence's and
    the inputs' styles on any module."""
    if type(style).__name__ in _ANY_MODULE:
        return
    wrapped = _lora_wrapped(module)
    if wrapped is not None and not isinstance(wrapped, nn.Linear):
        raise ValueError(f"fx.shard: the tensor-parallel plan splits {name!r}, LoRA on "
                         f"{type(wrapped).__name__}; a plan splits LoRA on nn.Linear only "
                         "(leave the layer out of the plan, or out of target_modules)")
    split = [f"{kind}={layout!r}" for kind in ("input_layouts", "output_layouts")
             for layout in getattr(style, kind, ()) or ()
             if type(layout).__name__ == "Shard" and layout.dim != -1]
    if wrapped is not None and split:  # the adapter off the style would run on one rank's slice of the sequence
        raise ValueError(f"fx.shard: the tensor-parallel plan splits the sequence at the LoRA "
                         f"layer {name!r} ({type(style).__name__} with {', '.join(split)}); "
                         "its adapters run outside the style and would train on one rank's "
                         "slice, drifting apart silently. Split the sequence at a layer that "
                         "is not LoRA-wrapped, or leave this one out of target_modules")
    if not isinstance(wrapped or module, nn.Linear | nn.Embedding):
        raise ValueError(f"fx.shard: the tensor-parallel plan splits {name!r}, a "
                         f"{type(module).__name__}; torch's styles split nn.Linear and "
                         "nn.Embedding (run a norm on the sequence's split with "
                         "SequenceParallel(), lay out a block's inputs with "
                         "PrepareModuleInput(...))")


def _check_rowwise_inputs(modules: dict[str, nn.Module], plan: dict[str, Any]) -> None:
    """Refuses a rowwise ``nn.Linear`` that takes its input split along its features (torch's
    default, ``Shard(-1)``) with no colwise layer before it (in the model's order, since the
    last rowwise one) to split that input: the data's whole tensor would be read as one rank's
    slice of a wider one, and the first step fail inside torch."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    split = False  # the activations are split along their features here
    for name, style in plan.items():
        if isinstance(style, ColwiseParallel):
            split = True
        elif isinstance(style, RowwiseParallel) and isinstance(
                _lora_wrapped(modules[name]) or modules[name], nn.Linear):
            if isinstance(style.input_layouts[0], Shard) and not split:
                raise ValueError(
                    f"fx.shard: the tensor-parallel plan splits {name!r} rowwise, but no colwise "
                    "layer before it splits its input: RowwiseParallel takes its input split "
                    "along its features (what a colwise layer gives), and the whole input would "
                    "be read as one rank's slice; plan a colwise layer before it, or give "
                    f"{name!r}: RowwiseParallel(input_layouts=Replicate())")
            split = False


def _check_sequence_split(plan: dict[str, Any]) -> None:
    """Refuses ``SequenceParallel`` in a plan where no style splits the sequence: it takes its
    input as the rank's slice of the sequence already, and a whole one would be read as a slice
    of a longer sequence (GPT-2's ``ln_1`` alone, a Llama plan without the ``PrepareModuleInput``
    that starts the split)."""
    from ._split_checks import splits_the_sequence
    parallel = [n for n, s in plan.items() if type(s).__name__ == "SequenceParallel"]
    if parallel and not any(splits_the_sequence(s) for s in plan.values()):
        raise ValueError(
            f"fx.shard: the tensor-parallel plan runs {parallel[0]!r} on the sequence's split "
            "(SequenceParallel), but nothing in it splits the sequence: SequenceParallel takes "
            "its input as the rank's slice already, and the whole sequence would be read as a "
            "slice of a longer one; split it where the blocks start (PrepareModuleInput("
            "input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),)) on the first "
            "block, or RowwiseParallel(output_layouts=Shard(1)) on the layer before), or leave "
            "SequenceParallel out")
