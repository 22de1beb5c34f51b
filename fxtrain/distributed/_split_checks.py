"""What a tensor-parallel plan's styles need of the activations they split, checked where they
meet them: a clear error, the same on every rank, instead of a failure inside torch.

torch's styles split an activation along a dimension other than the features (the sequence,
for sequence parallelism) in three places: ``PrepareModuleInput`` that lays a whole input out
as ``Shard(d)``, a rowwise or colwise layer whose output is ``Shard(d)`` (a reduce-scatter), and
``SequenceParallel``, which takes a plain tensor as the rank's slice already and a replicated
DTensor to be split. Each splits evenly only: a sequence of 11 tokens on 2 ranks gave a shape
error on one rank and an abort on the other (issue 75, hole 5). ``checked(module, plan, mesh)``
gives each planned module a forward pre-hook (run before the style's own) that checks the
dimension it splits against the ranks, and that ``SequenceParallel``'s input has the dimension
it splits along. The shapes are the global ones, alike on every rank, so every rank stops with
the same ``ValueError``; in a compiled step the check runs while Dynamo traces (static shapes),
raised as itself (``traced_errors.fail``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._torch.traced_errors import fail


def _split_dims(layouts: Any) -> list[int | None]:
    from torch.distributed.tensor import Shard
    return [x.dim if isinstance(x, Shard) else None for x in layouts or ()]


def splits_the_sequence(style: Any) -> bool:
    """Whether ``style`` splits an activation along a dimension other than its last (what
    ``SequenceParallel`` needs before it)."""
    inner = [style, getattr(style, "prepare_module_input", None),
             getattr(style, "prepare_module_output", None)]
    for s in (s for s in inner if s is not None):
        dims = _split_dims(getattr(s, "desired_input_layouts", None))
        dims += _split_dims((getattr(s, "desired_input_kwarg_layouts", None) or {}).values())
        if type(s).__name__ in ("ColwiseParallel", "RowwiseParallel", "PrepareModuleOutput"):
            dims += _split_dims(getattr(s, "output_layouts", None))
        if any(d is not None and d != -1 for d in dims):
            return True
    return False


def _check_dim(name: str, style: str, x: Any, dim: int, ranks: int, what: str,
               features: int = 1) -> None:
    """``x``'s dimension ``dim`` (not its last, the features: ``features=0`` for an
    embedding's ids, whose output adds them) splits evenly over ``ranks``."""
    if not isinstance(x, torch.Tensor):
        return
    if not -x.dim() <= dim < x.dim() - features:
        fail(ValueError, f"fx.shard: the tensor-parallel plan's {style} on {name!r} splits its "
                         f"{what} along dimension {dim} (a sequence), but it gets a tensor of "
                         f"shape {tuple(x.shape)}, whose dimension {dim} is not before its "
                         "last (its features): plan it where the activations have a sequence "
                         "dimension, or leave that module out of the plan")
    size = x.shape[dim]
    if size % ranks:
        fail(ValueError, f"fx.shard: the tensor-parallel plan's {style} on {name!r} splits its "
                         f"{what} of shape {tuple(x.shape)} along dimension {dim} over {ranks} "
                         f"ranks, which does not divide its {size}: torch splits evenly only; "
                         f"give the batch a sequence length that is a multiple of {ranks} "
                         "(pad it), or leave the sequence whole")


def _pre_hook(name: str, style: Any, ranks: int) -> Any:
    from torch.distributed.tensor import DTensor, Replicate
    kind = type(style).__name__
    prepare = getattr(style, "prepare_module_input", None) or (
        style if kind == "PrepareModuleInput" else None)

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if prepare is not None:
            pairs = list(zip(args, prepare.input_layouts or (),
                             prepare.desired_input_layouts or ()))
            pairs += [(kwargs.get(k), prepare.input_kwarg_layouts.get(k), d)
                      for k, d in prepare.desired_input_kwarg_layouts.items()]
            for x, have, want in pairs:
                dims = _split_dims((want,))
                if isinstance(have, Replicate) and dims[0] is not None:
                    _check_dim(name, kind, x, dims[0], ranks, "input")
        elif kind in ("ColwiseParallel", "RowwiseParallel") and args:
            for dim in _split_dims(style.output_layouts):
                if dim is not None and dim != -1:  # a reduce-scatter of the output
                    _check_dim(name, kind, args[0], dim, ranks, "output",
                               features=int(not isinstance(module, nn.Embedding)))
        elif kind == "SequenceParallel" and args:
            dim = style.sequence_sharding[0].dim
            x = args[0]
            if isinstance(x, DTensor):
                if x.placements != style.sequence_sharding:
                    _check_dim(name, kind, x, dim, ranks, "input")
            else:
                _check_dim(name, kind, x, dim, 1, "input")  # the rank's slice already
    return check


def checked(module: nn.Module, plan: dict[str, Any], ranks: int) -> None:
    """Gives each of ``plan``'s modules in ``module`` (the skeleton's copy that runs the plan)
    the check of what its style splits (see the module), run before the style's own hooks."""
    for name, style in plan.items():
        module.get_submodule(name).register_forward_pre_hook(
            _pre_hook(name, style, ranks), prepend=True, with_kwargs=True)
