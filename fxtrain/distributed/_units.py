"""Per-block sharding: units whose parameters are gathered for their own forward only.

``fx.shard(state, units=...)`` (see ``fxtrain.distributed``) makes blocks of the model units, as
FSDP2's ``fully_shard`` does: each unit's class becomes a subclass of its own
(``ShardedGPT2Block`` for a ``GPT2Block``, in the copy of the skeleton it prepares: the state's
``layout`` names the units and keeps the skeleton as it was) whose ``forward`` all-gathers the
unit's sharded parameters just before running, inside an activation-checkpointed region
(``torch.utils.checkpoint``, non-reentrant) whose policy recomputes only the gather: the unit's
activations are kept as they would be, its whole parameters are freed after its forward and
gathered again when its backward needs them. The gather's own backward is a reduce-scatter, so
a unit's gradients arrive on each rank's shard (summed over the ranks) as soon as the unit's
backward has run. This is torchtitan's SimpleFSDP on fxtrain's step: the collectives are
functional collectives that ``torch.compile`` traces into the step's one graph, where Inductor
may bucket and reorder them; eager, they run where the unit runs.

Parameters outside every unit (embeddings, a final norm, a head: the root) are gathered whole
once per step, as an unsharded state's are, and their gradients reduce-scattered with the
others. A unit is refused when it shares a parameter with anything outside it (a tied
embedding belongs to the root), or when units nest.

Mixed precision of the collectives (FSDP2's ``MixedPrecisionPolicy``): ``param_dtype`` gathers
the parameters in that dtype, and the unit computes in it (its floating-point inputs are cast
to it, its outputs in that dtype cast back to its inputs' dtype); ``reduce_dtype``
reduce-scatters their gradients in that one. The shards, the optimizer and the gradients it
sees stay in the parameters' own dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._torch import collectives
from .._torch.inductor import keep_recomputation_in_the_backward
from .._torch.modules import reparametrized
from .._torch.traced_errors import fail
from . import _float8_gather, _unit_gather
from ._dtensors import is_dtensor
from ._layout import Gather


FLOAT8_GATHER_REGION = (
    "enable_fsdp_float8_all_gather: fx.shard's units gather float8 weights in eager and compiled "
    "steps, but not in an eager step inside an activation-checkpointed region (fx.remat, "
    "torch.utils.checkpoint), whose rerun would not find the gathered weights: compile the step, "
    "leave the units out of the region, or convert the model without the option (its units then "
    "gather the float32 weights and cast them to float8 after the gather)")


class ShardedUnit:
    """What a unit's class adds to the module's own (the first base of ``Sharded<Name>``): a
    forward that gathers its parameters as the class's ``gather`` says."""

    gather: Gather

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return unit_forward(self, super().forward, args, kwargs)  # type: ignore[misc]


@functools.cache
def _unit_class(cls: type, gather: Gather) -> type:
    """``Sharded<Name>``: ``cls`` with a forward gathering as ``gather`` says (made once per
    class and gather)."""
    return type(f"Sharded{cls.__name__}", (ShardedUnit, cls), {"gather": gather})


def _outermost(found: list[str]) -> list[str]:
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def _auto(module: nn.Module) -> list[str]:
    """The model's repeated blocks: transformers' ``_no_split_modules`` (the blocks it keeps
    whole on one device), else every child of every ``nn.ModuleList`` and the children of an
    ``nn.Sequential`` that repeat one class of block (a module of layers, at least two of them
    with parameters: a Sequential of single layers, an MLP, has none), the outermost."""
    kinds = set(getattr(module, "_no_split_modules", None) or ())
    found = [n for n, m in module.named_modules() if n and type(m).__name__ in kinds]
    if found:
        return _outermost(found)
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList):
            found += [_joined(name, child) for child, _ in m.named_children()]
        elif isinstance(m, nn.Sequential):
            found += [_joined(name, child) for child in _repeated_blocks(m)]
    return _outermost(found)


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _repeated_blocks(sequential: nn.Sequential) -> list[str]:
    """The children of ``sequential`` of the class of block that repeats most in it."""
    blocks: dict[type, list[str]] = {}
    for name, child in sequential.named_children():
        if any(True for _ in child.children()) and any(True for _ in child.parameters()):
            blocks.setdefault(type(child), []).append(name)
    repeated = max(blocks.values(), key=len, default=[])
    return repeated if len(repeated) >= 2 else []


def described(module: nn.Module, found: list[str]) -> str:
    """Which blocks ``_auto`` chose, for the log: their class, where and how many."""
    modules = dict(module.named_modules())
    kinds = sorted({type(modules[n]).__name__ for n in found})
    parents = sorted({n.rpartition(".")[0] for n in found})
    rule = ("transformers' _no_split_modules" if set(kinds) <= set(
        getattr(module, "_no_split_modules", None) or ()) else "repeated blocks")
    return (f"{len(found)} units, {rule}: {'/'.join(kinds)} in "
            f"{', '.join(repr(p) if p else 'the model' for p in parents)} "
            f"({_listed(found, 3)})")


def resolve(module: nn.Module, units: str | Sequence[str | type]) -> list[str]:
    """The qualified names of the submodules ``units`` names: ``"auto"``, or qualified names
    and module classes (each class: its outermost instances)."""
    if isinstance(units, str):
        if units != "auto":
            raise ValueError(f"fx.shard: units must be 'auto', 'whole', None or a list of "
                             f"submodule names or module classes, got {units!r}")
        found = _auto(module)
        if not found:
            raise ValueError(f"fx.shard(units='auto'): {type(module).__name__} has no "
                             "repeated blocks to take units from (an nn.ModuleList, an "
                             "nn.Sequential of blocks of one class, transformers' "
                             "_no_split_modules); name its units: units=['encoder.0', ...] or "
                             "units=[BlockClass]")
        _check(module, found)
        return found
    modules = dict(module.named_modules())
    found = []
    for unit in units:
        if isinstance(unit, type):
            matches = _outermost([n for n, m in modules.items() if n and isinstance(m, unit)])
            if not matches:
                raise ValueError(f"fx.shard: no submodule of {type(module).__name__} is a "
                                 f"{unit.__name__}")
            found += matches
        elif isinstance(unit, str) and unit in modules and unit:
            found.append(unit)
        else:
            raise ValueError(f"fx.shard: {unit!r} is not a submodule of "
                             f"{type(module).__name__}; units are qualified submodule names "
                             f"or module classes. {_candidates(module, unit)}")
    _check(module, found)
    return found


def _candidates(module: nn.Module, name: Any) -> str:
    """The submodules a mistyped unit name may have meant, or the blocks 'auto' would take."""
    import difflib
    names = [n for n, _ in module.named_modules() if n]
    close = difflib.get_close_matches(str(name), names, n=5) if isinstance(name, str) else []
    blocks = _auto(module)
    if close:
        return f"Did you mean {_listed(close, 5)}?"
    if blocks:
        return f"Its blocks (units='auto'): {_listed(blocks, 6)}."
    return f"Its submodules: {_listed(names, 8)}."


def _listed(names: list[str], most: int) -> str:
    return ", ".join(map(repr, names[:most])) + (", ..." if len(names) > most else "")


def _check(module: nn.Module, found: list[str]) -> None:
    """Units neither nest nor share a parameter with anything outside them."""
    nested = [(a, b) for a in found for b in found if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"fx.shard: units nest ({nested[0][1]!r} is inside {nested[0][0]!r}); "
                         "name the outer or the inner ones")
    owners: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        unit = next((u for u in found if name.startswith(u + ".")), "")
        owners.setdefault(id(p), set()).add(unit)
    for name, p in module.named_parameters(remove_duplicate=False):
        if len(owners[id(p)]) > 1:
            where = ", ".join(repr(u) if u else "the root" for u in sorted(owners[id(p)]))
            raise ValueError(f"fx.shard: the parameter {name!r} is shared by {where}; a tied "
                             "parameter must live outside the units (leave one of those "
                             "modules out of units)")


def install(module: nn.Module, found: list[str], gather: Gather,
            planned: frozenset[str] = frozenset(),
            float8: frozenset[str] = frozenset()) -> nn.Module:
    """A copy of the skeleton ``module`` whose submodules ``found`` are units gathering as
    ``gather`` says; ``planned`` names the parameters a tensor-parallel plan splits, ``float8``
    the weights gathered in float8 (``fxtrain.distributed._float8_gather``)."""
    module = copy.deepcopy(module)  # a skeleton: meta tensors, nothing to copy
    for name in found:
        unit = module.get_submodule(name)
        if not any(True for _ in unit.parameters()):
            raise ValueError(f"fx.shard: the unit {name!r} has no parameters")
        own = frozenset(k[len(name) + 1:] for k in planned if k.startswith(name + "."))
        low = frozenset(k[len(name) + 1:] for k in float8 if k.startswith(name + "."))
        unit.__class__ = _unit_class(type(unit), dataclasses.replace(gather, planned=own,
                                                                     float8=low))
    return module


def _shard0(p: Any) -> bool:
    from torch.distributed.tensor import Shard
    return p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),) and p.ndim >= 1


def gather(p: Any, how: Gather = Gather(), planned: bool = False) -> torch.Tensor:
    """The whole value of the DTensor ``p`` (anything else as it is), differentiable: its
    gradient comes back onto ``p``'s layout summed over the ranks (a ``Shard(0)`` parameter's
    reduce-scattered, a replicated one's all-reduced). On a 2-D mesh, what the forward takes
    (``fxtrain.distributed._meshes.value``: ``planned``, the plan's DTensor)."""
    if not is_dtensor(p):
        return p
    if how.roles is not None:
        from . import _meshes
        return _meshes.value(p, how.roles, planned, how.param_dtype)
    if not _shard0(p):
        from torch.distributed.tensor import Partial, Replicate
        ndim = p.device_mesh.ndim
        return p.redistribute(p.device_mesh, [Replicate()] * ndim).to_local(
            grad_placements=[Partial("sum")] * ndim)
    mesh = p.device_mesh
    world = mesh.size()
    rows = -(-p.shape[0] // world)
    local = p.to_local()
    if local.shape[0] < rows:  # Shard(0) splits as torch.chunk: the last ranks may hold fewer
        local = nn.functional.pad(local, (*([0, 0] * (local.ndim - 1)), 0, rows - local.shape[0]))
    dtype = how.param_dtype or p.dtype
    if how.reduce_dtype is None or how.reduce_dtype == dtype:
        local = local.to(dtype)  # the gather's backward: a sum
        whole = collectives.wait_tensor(collectives.all_gather_single(local, 0, mesh))
    else:  # the gradient summed in reduce_dtype
        whole = collectives.all_gather_shard(local.to(dtype), world, mesh.get_group().group_name,
                                             how.reduce_dtype)
    return whole[:p.shape[0]]


@functools.cache
def _gather_ops() -> frozenset:
    """The gather's ops (``collectives.gather_ops``) and the keyed stream's key derivations."""
    return collectives.gather_ops() | {torch.ops.fxtrain.fold_in_range.default}


def _recompute_gathers(ctx, op, *args, **kwargs):
    """The checkpoint policy of a unit's region: the gather (the collectives with the op that
    ties their output to the work to wait for, and the views and copies that lay their output
    out) is recomputed in the backward; everything else is saved, as without the region. So
    are the keyed stream's key derivations, which an eager rerun takes from where the region
    started rather than from a block drawn before it (``fxtrain.random.keyed``): the masks come
    out the same. A cast to float8 is saved: a float8 weight's shard, whose all-gather
    (``fxtrain.distributed._float8_gather``) is then recomputed from a quarter of float32's
    bytes."""
    del ctx, args
    from torch.utils.checkpoint import CheckpointPolicy
    if collectives.casts_to_float8(op, kwargs):
        return CheckpointPolicy.PREFER_SAVE
    if op in _gather_ops() or op.is_view:
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_SAVE


def _contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_recompute_gathers)


def _first_float(tree: Any) -> torch.dtype | None:
    import torch.utils._pytree as pytree
    return next((t.dtype for t in pytree.tree_leaves(tree)
                 if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _cast(tree: Any, dtype: torch.dtype | None, only: torch.dtype | None = None) -> Any:
    """``tree`` with its floating-point tensors (those of dtype ``only``, if given) in ``dtype``
    (None: as they are)."""
    import torch.utils._pytree as pytree
    if dtype is None:
        return tree
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() and (
            only is None or t.dtype == only) else t, tree)


def unit_forward(unit: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
    """``forward(*args, **kwargs)`` with the unit's sharded parameters gathered for it (see
    the module); a unit bound to whole tensors runs as it is."""
    bound = {n: t for n, t in unit.named_parameters(remove_duplicate=False) if is_dtensor(t)}
    if not bound:
        return forward(*args, **kwargs)
    keys, how = list(bound), unit.gather
    if _unit_gather.applies(list(bound.values()), how):  # eager: FSDP2's way, see there
        inputs, kw = _cast((args, kwargs), how.param_dtype)
        out = _unit_gather.run(lambda: forward(*inputs, **kw), list(bound.values()),
                               [k in how.planned for k in keys], how,
                               lambda whole: reparametrized(unit, dict(zip(keys, whole))),
                               _float8_weights(unit, bound, how))
        return _cast(out, _first_float((args, kwargs)), only=how.param_dtype)
    if how.float8 and not torch.compiler.is_compiling():
        fail(ValueError, FLOAT8_GATHER_REGION)

    def gathered_forward(*flat: Any, **kw: Any) -> Any:
        whole = {k: _float8_gather.traced(t, _layer(unit, k), how) if k in how.float8 else
                 gather(t, how, k in how.planned) for k, t in zip(keys, flat[:len(keys)])}
        inputs, kw = _cast((flat[len(keys):], kw), how.param_dtype)
        with reparametrized(unit, whole):
            out = forward(*inputs, **kw)
        return _cast(out, _first_float((flat[len(keys):], kw)), only=how.param_dtype)

    if not torch.is_grad_enabled():  # nothing to keep for a backward
        return gathered_forward(*bound.values(), *args, **kwargs)
    from torch.utils.checkpoint import checkpoint
    if torch.compiler.is_compiling():  # as fx.remat's regions: see there
        keep_recomputation_in_the_backward()
    return checkpoint(gathered_forward, *bound.values(), *args, use_reentrant=False,
                      context_fn=_contexts, **kwargs)


def _float8_weights(unit: nn.Module, bound: dict[str, Any], how: Gather
                    ) -> dict[int, torch.Tensor]:
    """The unit's weights that gather in float8, gathered (``_float8_gather``), by their index
    in ``bound``."""
    low = [i for i, k in enumerate(bound) if k in how.float8]
    if not low:
        return {}
    keys, params = list(bound), list(bound.values())
    layers = [_layer(unit, keys[i]) for i in low]
    return dict(zip(low, _float8_gather.gathered_weights([params[i] for i in low], layers,
                                                         how)))


def _layer(unit: nn.Module, name: str) -> nn.Module:
    """The layer of ``unit`` whose parameter ``name`` is."""
    return unit.get_submodule(name.rpartition(".")[0])


def outside(params: dict[str, Any], units: tuple[str, ...]) -> list[str]:
    """The names of ``params`` that none of the ``units`` holds (the root's)."""
    return [k for k in params if not any(k.startswith(u + ".") for u in units)]
