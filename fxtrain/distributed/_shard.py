"""A sharded ``TrainState`` (FSDP-style) on ``torch.distributed.tensor``.

``fx.shard(state)`` turns every parameter, and the optimizer state that has a parameter's shape,
into a ``DTensor`` split along its first dimension over a 1-D ``DeviceMesh`` of all the ranks
(``Shard(0)``; 0-d tensors are replicated): each rank holds about 1/N of the parameters and
optimizer state. ``make_train_step`` sees the DTensors and, inside its one compiled graph,
all-gathers the parameters before the forward and backward, reduce-scatters (averages) the
gradients onto each rank's shard, and runs the optimizer on the shards, as DTensor operations:
global norms (clipping, ``grad_norm``) reduce over the ranks by themselves. Buffers stay whole
and are averaged as in data parallel. Sharding is data parallel too: every rank takes its own
share of the global batch (``fx.data.Batches`` splits it under torchrun).

By default a model with blocks (transformers' ``_no_split_modules``, else the children of its
``nn.ModuleList`` and the repeated blocks of its ``nn.Sequential``) is sharded per block (``fxtrain.distributed._units``; the default step,
``autodiff="auto"``, takes autograd's path for it): each block gathers its parameters for its
own forward, frees them, gathers them again for its backward and reduce-scatters its gradients
as soon as they are ready, so a step holds about one block's whole parameters at a time. A model without blocks,
and every model under torch before 2.13 (whose Dynamo cannot compile those gradients), is
sharded whole, as is any with ``units="whole"``: its parameters are gathered whole for the step
(as FSDP does with one unit that is not resharded after the forward): the state costs 1/N per
rank, a step's transient peak holds the full parameters and gradients once.

A 2-D mesh shards over one dimension and either runs a tensor-parallel plan or replicates over
the other (FSDP x TP, HSDP): see ``fxtrain.distributed._meshes``.

Checkpoints of a sharded state are sharded too (``fx.checkpoint``): each rank writes its own
shards with ``torch.distributed.checkpoint``, and a checkpoint restores onto any number of ranks.
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._torch.groups import forget_groups, forget_sharding_caches
from .._torch.modes import outside_dispatch_modes
from .._torch.version import at_least
from . import _context, _meshes, _offload, _ranks, _tensor_parallel, _units
from ._dtensors import distributed, is_dtensor, is_sharded
from ._layout import Gather, Layout, Roles


def _for_the_current_group() -> None:
    """Once per default process group (a program that destroys its group and starts another:
    a notebook run again, one test module after another): DTensor's sharding caches emptied
    (``forget_sharding_caches``). They match a mesh by its shape and names, not its group, and
    handed a traced step the mesh of the destroyed group ("Group ... is not registered" in
    ``get_local_rank``)."""
    if torch.distributed.group.WORLD is not None:
        _group_seen(_current_group())


def _current_group() -> weakref.ref:
    """The default process group, weakly: a key of the caches below that does not keep a
    destroyed group alive into the interpreter's finalization (see ``_release_group``), and
    that a later group at the same address does not equal."""
    return weakref.ref(torch.distributed.group.WORLD)


@functools.cache
def _group_seen(group: weakref.ref) -> None:
    forget_sharding_caches()


@functools.cache
def _made_mesh(group: weakref.ref, device_type: str, shape: tuple[int, ...],
               names: tuple[str, ...]):
    """The mesh of ``shape``, made once per default process ``group`` (a key only)."""
    from torch.distributed.device_mesh import init_device_mesh
    made = init_device_mesh(device_type, shape, mesh_dim_names=names)
    atexit.register(_release_group, made)
    return made


def _release_group(mesh: Any) -> None:
    """At exit: leaves the process group if the program has not, and drops the mesh's own
    reference to it (``fxtrain._torch.groups``), so the group is destroyed now, while the
    interpreter is whole.

    The mesh outlives ``destroy_process_group``: fxtrain caches it, and so do DTensor's sharding
    caches, through every ``DTensorSpec``. The gloo group it holds then lived into the
    interpreter's finalization, where a gloo worker thread that freed the last collective's
    work (whose tensors have Python objects) asked for the GIL; Python ends such a thread, and
    unwinding through the work's destructor aborted the process ("terminate called without an
    active exception", SIGABRT after a run that succeeded: 1 exit in 12-40 of a 2-rank sharded
    run under load, found with a core dump). Destroyed here, the group joins its workers first.
    """
    _ranks._leave()  # fx.distributed's own exit handler, which may run after this one
    forget_groups(mesh)


def mesh(shape: Sequence[int] | None = None, names: Sequence[str] | None = None):
    """The ``DeviceMesh`` over every rank of the process group (made once per group), on
    CUDA under NCCL and on the CPU otherwise: 1-D by default, or of ``shape`` (sizes whose
    product is the world size, the ranks in order row by row) with dimension ``names`` (default
    ``("dp", "tp")``): a 2-D mesh for ``fx.shard``'s FSDP x tensor parallel or HSDP, or, with a
    context-parallel dimension (``fx.shard(context=...)``), up to 3-D."""
    if not _ranks.initialized():
        raise RuntimeError("fx.shard needs an initialized process group: start the program "
                           "with torchrun and call fx.distributed.init() first")
    _for_the_current_group()
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    world = _ranks.world_size()
    if shape is None:
        return _made_mesh(_current_group(), device, (world,), ("shard",))
    shape = tuple(int(n) for n in shape)
    names = tuple(names) if names is not None else ("dp", "tp")[:len(shape)]
    if len(shape) not in (1, 2, 3) or len(names) != len(shape) or \
            math.prod(shape) != world or min(shape) < 1:
        raise ValueError(f"fx.sharding.mesh: shape {shape} with names {names} does not lay out "
                         f"the job's {world} ranks: give one to three sizes, every size at "
                         f"least 1, whose product is {world}, and a name for each")
    return _made_mesh(_current_group(), device, shape, names)


def _placements(t: torch.Tensor) -> list:
    from torch.distributed.tensor import Replicate, Shard
    return [Shard(0)] if t.ndim >= 1 else [Replicate()]


def _like(values: Any, template: Any, mesh: Any, what: str) -> Any:
    """``values`` with each leaf whose ``template`` leaf is a DTensor distributed like it."""
    flat, spec = pytree.tree_flatten(values)
    like, like_spec = pytree.tree_flatten(template)
    if spec != like_spec:
        raise ValueError(f"fx.shard: {what} does not have the structure its init gives on the "
                         "sharded parameters; shard the state TrainState.create made")
    return pytree.tree_unflatten([distributed(v, mesh, t.placements) if is_dtensor(t)
                                  else v for v, t in zip(flat, like)], spec)


def _warn_parameter_copies(callbacks: dict, params: dict) -> None:
    """Warns about whole callback tensors shaped like a parameter: copies of the parameters
    (an average, the best weights) that would meet the sharded ones in a callback."""
    shapes = {(tuple(p.shape), p.dtype): k for k, p in params.items() if p.ndim >= 1}
    for path, leaf in pytree.tree_flatten_with_path(callbacks)[0]:
        key = (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else None
        if key in shapes and not is_dtensor(leaf):
            warnings.warn(
                f"fx.shard: state.callbacks{pytree.keystr(path)} is a whole tensor shaped like "
                f"the parameter {shapes[key]!r}; if the callback keeps copies of the parameters, "
                "pass it to fx.shard(state, callbacks=[...]) so its state is sharded too, or "
                "create its state after sharding (fx.fit creates the missing ones)",
                stacklevel=3)
            return


def shard(state: Any, mesh: Any = None, *, callbacks: Sequence[Callable] = (),
          units: str | Sequence[str | type] | None = None,
          param_dtype: torch.dtype | None = None,
          reduce_dtype: torch.dtype | None = None, tp_plan: Any = None,
          offload: str | None = None, context: str | None = None) -> Any:
    """``state`` with its parameters and their optimizer state sharded across the ranks.

    Every rank calls it with its state; rank 0's values are the ones scattered, so ranks that
    built their models differently still start alike. The optimizer state is matched to the
    parameters through ``state.tx.init``: its leaves that ``init`` makes from a parameter are
    sharded like that parameter; counts, schedules and other small leaves stay whole.
    Buffers stay whole (replicated) on every rank, and so do callback states, except those of
    ``callbacks``, matched through their ``init`` as the optimizer state is (the parameter
    copies of ``swa`` or ``early_stopping(restore_best=True)``).

    Args:
      state: a ``TrainState`` (not already sharded).
      mesh: a ``DeviceMesh`` over every rank; default ``fx.sharding.mesh()``, 1-D. A 2-D mesh
        (``fx.sharding.mesh((rows, columns), names)``, see ``fxtrain.distributed._meshes``) takes FSDP x
        tensor parallel with a ``tp_plan`` (sharded over its first dimension, the plan over
        its second) and HSDP without (replicated over its first dimension, sharded over its
        second); its steps take autograd's path.
      callbacks: callbacks whose states in ``state.callbacks`` are sharded like their ``init``
        on the sharded parameters. Callback states created after sharding (``fx.fit`` creates
        the missing ones) are sharded already.
      units: per-block sharding (see ``fxtrain.distributed._units``): ``"auto"`` (transformers'
        ``_no_split_modules`` blocks, else each child of every ``nn.ModuleList`` and the
        children of an ``nn.Sequential`` that repeat one class of block; logged), or
        submodule names and module classes. A unit's parameters are gathered just before its
        forward, freed after it, gathered again for its backward, and its gradients
        reduce-scattered as soon as its backward has run, so a step holds about one unit's
        whole parameters at a time. Its step takes autograd's path (``make_train_step``'s
        default ``autodiff="auto"`` does; ``"func"`` is refused). ``"whole"``: the whole model
        is one unit, gathered once per step. None (default): ``"auto"``'s blocks where the
        model has them (and they share no parameter with the rest) and torch is 2.13 or later,
        else ``"whole"``; the choice is logged.
      param_dtype: the dtype units gather and compute their parameters in (for example
        ``torch.bfloat16``); None: the parameters' own.
      reduce_dtype: the dtype units reduce-scatter their gradients in (for example
        ``torch.float32`` with a bfloat16 ``param_dtype``, as FSDP2's mixed precision);
        None: ``param_dtype``.
      tp_plan: tensor parallelism instead of sharding (``fxtrain.distributed._tensor_parallel``): a dict
        ``{submodule: ColwiseParallel() | RowwiseParallel() | SequenceParallel() |
        PrepareModuleInput(...) | ... | "colwise" | "rowwise" | ...}`` (``*`` for an index;
        transformers' style names, so a model's own ``model._tp_plan``; sequence and loss
        parallel: ``docs/distributed.md``) or ``"auto"`` (a transformers model's
        ``base_model_tp_plan``). The
        planned layers' parameters are split over the mesh's ranks, which train on the same
        batch; the rest stay whole (on a 2-D mesh, sharded over its first dimension). On the
        autograd path (the default step's ``autodiff="auto"`` takes it); a 1-D mesh's plan
        takes no ``units``, ``param_dtype`` or sharded callbacks.
      offload: ``"optimizer"`` keeps the optimizer state's shards in host memory and runs
        the update there, as FSDP2's ``CPUOffloadPolicy`` (``fxtrain.distributed._offload``):
        a step copies the gradient and parameter shards to the host and the new parameters
        back, and gives the same bits as without it. None (default): every tensor on its
        device.
      context: context parallelism (``fxtrain.distributed._context``): the name of ``mesh``'s
        dimension whose ranks split every sequence (``(dp, cp)``, ``(dp, cp, tp)`` with a
        ``tp_plan``, ``(replicate, shard, cp)``; ``fx.sharding.mesh((2, 2, 2), ("dp", "cp",
        "tp"))``). Each rank of it takes a head and a tail chunk of each sequence of its
        group's batch share (the step cuts the batch: a dict of ``input_ids``, ``labels``
        and, for packed documents, ``position_ids``; the loss reads ``shift_labels``, the
        model takes ``position_ids`` and ``document_mask``), attention runs as a ring over it
        (a transformers model's, causal; packed documents over every rank's keys and values,
        masked), and the parameters shard over it with the dimension before it, per block
        as without it (``units``). None (default): whole sequences on every rank.

    Returns:
      The sharded state: ``state.params[name]`` is a ``DTensor`` whose ``.to_local()`` is this
      rank's rows, ``.full_tensor()`` (a collective: every rank calls it) the whole parameter.
    """
    if is_sharded(state.params) or state.layout.sharded:
        raise ValueError("fx.shard: this state is already sharded")
    offload = _offload.checked(offload)
    split = None
    if context is not None:
        if mesh is None:
            raise ValueError(f"fx.shard(context={context!r}) names a dimension of the mesh; "
                             "pass the mesh, for example fx.sharding.mesh((2, 2), "
                             "('dp', 'cp'))")
        mesh, split = _context.laid_out(mesh, context, tp_plan, globals()["mesh"])
        # the attention routed before the units are made (a copy of the skeleton: the step
        # runs the module the units' install made, as without context parallelism; a copy
        # made after it, on a simulated rank's fake tensors, corrupted the heap in 3 runs of 4)
        from . import _context_attention  # torch's ring functions, imported when first used
        original, state = state.module, state.replace(
            module=_context_attention.prepared(state.module, split))
    new = _sharded(state, mesh, callbacks, units, param_dtype, reduce_dtype, tp_plan)
    if split is not None:  # the skeleton as it was: what evaluation and export run whole
        new = new.replace(layout=new.layout.replace(context=split, skeleton=original))
    if offload is None:
        return new
    return new.replace(layout=new.layout.replace(offload=offload),
                       opt_state=_offload.to_host(new.opt_state))


def _sharded(state: Any, mesh: Any, callbacks: Sequence[Callable], units: Any,
             param_dtype: Any, reduce_dtype: Any, tp_plan: Any) -> Any:
    """``shard``'s state on the device: the mesh checked, then its path by the mesh and plan."""
    _for_the_current_group()
    mesh = mesh if mesh is not None else globals()["mesh"]()
    if mesh.ndim not in (1, 2):
        raise ValueError(f"fx.shard takes a 1-D or 2-D DeviceMesh, got one of shape "
                         f"{tuple(mesh.shape)} (3-D: name its context dimension, context=...)")
    if mesh.size() != _ranks.world_size():
        raise ValueError(f"fx.shard: the mesh spans {mesh.size()} ranks, the job has "
                         f"{_ranks.world_size()}: every rank trains on its share of the "
                         "batch and the gradients are reduced over the mesh, so it must span "
                         "every rank; pass fx.sharding.mesh(), or none")
    float8 = _float8_gathered(state.module)
    if float8 and (mesh.ndim == 2 or tp_plan is not None):
        raise ValueError(f"fx.shard: {_FLOAT8_GATHER} on a 1-D mesh without a tp_plan only "
                         "(not yet on a 2-D mesh or with tensor parallelism); convert the "
                         "model without the option")
    if mesh.ndim == 2:
        return _two_dimensional(state, mesh, tp_plan, units, param_dtype, reduce_dtype,
                                callbacks)
    if tp_plan is not None:
        return _with_plan(state, mesh, tp_plan, units, param_dtype, reduce_dtype, callbacks)
    module = state.module
    found = _default_units(module) if units is None else \
        [] if units == "whole" else _units.resolve(module, units)
    outside = sorted(k for k in float8 if not any(k.startswith(u + ".") for u in found))
    if outside:
        raise ValueError(f"fx.shard: {_FLOAT8_GATHER} in per-block units only, and "
                         f"{outside[0]!r} is {'outside every unit' if found else 'sharded whole'}"
                         "; shard with units that hold every float8 layer (units='auto' or "
                         "a list), or leave that layer out of the float8 conversion (filter=)")
    if units == "auto":
        logging.getLogger("fxtrain").info("fx.shard: units='auto' chose %s",
                                          _units.described(module, found))
    gather = Gather(param_dtype, reduce_dtype)
    if found:
        module = _units.install(module, found, gather, float8=float8)
    elif param_dtype is not None or reduce_dtype is not None:
        raise ValueError("fx.shard: param_dtype and reduce_dtype are how units gather and "
                         "reduce, and this state is sharded whole; pass units=... too (for "
                         "example units='auto')")
    params = {k: distributed(p, mesh, _placements(p)) for k, p in state.params.items()}
    layout = _laid_out(state, mesh, Roles(shard=0), units=tuple(found), gather=gather)
    state = _with_frozen(state, lambda k, b: distributed(b, mesh, _placements(b)))
    return _with_params(state, module, layout, params, callbacks)


def _with_frozen(state: Any, place: Callable[[str, Any], Any]) -> Any:
    """``state`` with its frozen parameters (``Layout.frozen``, kept among its buffers) laid
    out by ``place(name, tensor)``, as its parameters are: sharded, with no optimizer state."""
    frozen = {k: place(k, b) for k, b in (state.buffers or {}).items()
              if k in state.layout.frozen}
    return state.replace(buffers={**state.buffers, **frozen}) if frozen else state


_FLOAT8_GATHER = "enable_fsdp_float8_all_gather gathers float8 weights"


def _float8_gathered(module: Any) -> frozenset[str]:
    """The weights ``module`` asks to gather in float8 (``fxtrain._torch.float8``'s layers,
    made only once that module is imported: none before)."""
    fence = sys.modules.get("fxtrain._torch.float8")
    return fence.float8_gathered(module) if fence is not None else frozenset()


def _laid_out(state: Any, mesh: Any, roles: Roles, **facts: Any) -> Layout:
    """The layout ``fx.shard`` gives ``state``: its own facts of the model (tied names, its
    checkpointing) with ``mesh``, ``roles`` and ``facts``, and the skeleton as it was."""
    before = state.layout
    return Layout(mesh=mesh, roles=roles, tied=before.tied, checkpointing=before.checkpointing,
                  frozen=before.frozen,
                  skeleton=state.module, guard=before.guard, **facts)


def _with_params(state: Any, module: Any, layout: Layout, params: dict,
                 callbacks: Sequence[Callable]) -> Any:
    """``state`` on its distributed ``params``, the ``module`` that runs them and its
    ``layout``: the optimizer state and ``callbacks``' states laid out like the parameters they
    follow."""
    mesh = layout.mesh
    # which optimizer leaves follow a parameter's layout: those tx.init makes from one
    new = state.replace(params=params, module=module, layout=layout)
    new = new.replace(opt_state=_like(state.opt_state, new.init_opt_state(params), mesh,
                                      "the optimizer state"))
    states = dict(state.callbacks or {})
    for cb in callbacks:  # fx.callbacks' Callback: a name and an init (duck-typed: no import)
        name, init = getattr(cb, "name", None), getattr(cb, "init", None)
        if init is None:
            raise TypeError(f"fx.shard: callbacks=[...] takes stateful callbacks (with an "
                            f"init); {cb!r} has none")
        template = init(new.replace(callbacks=None))
        if name not in states:
            raise ValueError(f"fx.shard: callbacks=[...] names {name!r}, which has no state in "
                             f"state.callbacks (it has {sorted(states)})")
        states[name] = _like(states[name], template, mesh, f"state.callbacks[{name!r}]")
    _warn_parameter_copies(states, state.params)
    return new.replace(callbacks=states or state.callbacks)


def _with_plan(state: Any, mesh: Any, tp_plan: Any, units: Any, param_dtype: Any,
               reduce_dtype: Any, callbacks: Sequence) -> Any:
    """``shard``'s ``tp_plan``: the plan placed on the skeleton and the parameters."""
    if units not in (None, "whole") or param_dtype is not None or reduce_dtype is not None \
            or callbacks:
        raise ValueError("fx.shard(tp_plan=...) splits the planned layers over the mesh and "
                         "keeps the rest whole; per-block units, param_dtype, reduce_dtype and "
                         "sharded callbacks do not combine with it yet (a 2-D mesh)")
    plan = _tensor_parallel.plan_of(state.module, tp_plan)
    module, placed = _tensor_parallel.placed_on(state.module, plan, mesh, state.params)
    params = {n: distributed(p, mesh, placed[n]) if n in placed else p
              for n, p in state.params.items()}
    state = _with_frozen(state, lambda k, b: distributed(b, mesh, placed[k]) if k in placed
                         else b)
    logging.getLogger("fxtrain").info("fx.shard: tensor parallel over %d ranks, %d layers "
                                      "split", mesh.size(), len(plan))
    layout = _laid_out(state, mesh, Roles(tp=0), planned=tuple(plan))
    return _with_params(state, module, layout, params, ())


def _two_dimensional(state: Any, mesh: Any, tp_plan: Any, units: Any, param_dtype: Any,
                     reduce_dtype: Any, callbacks: Sequence) -> Any:
    """``shard`` on a 2-D mesh (``fxtrain.distributed._meshes``): FSDP x tensor parallel with a
    plan, HSDP without; the data dimension's shards gathered whole or per unit."""
    _meshes.check(mesh, _ranks.world_size())
    if reduce_dtype is not None and reduce_dtype != param_dtype:
        raise ValueError("fx.shard: on a 2-D mesh the gradients are reduce-scattered in the "
                         "dtype the parameters are gathered in (param_dtype); a reduce_dtype "
                         "other than it is not supported there yet")
    roles = _meshes.of(mesh, tp_plan)
    # the skeleton (meta tensors, the plan's meta DTensors) is no dispatch mode's business: a
    # simulated rank's FakeTensorMode cannot copy a meta DTensor (benchmarks/simulate.py)
    with outside_dispatch_modes():
        module, tp, plan = copy.deepcopy(state.module), {}, {}  # a skeleton: no tensors to copy
        if tp_plan is not None:
            plan = _tensor_parallel.plan_of(module, tp_plan)
            module, tp = _tensor_parallel.placed_on(
                module, plan, mesh[mesh.mesh_dim_names[roles.tp]], state.params)
        found = _default_units(module) if units is None else \
            [] if units == "whole" else _units.resolve(module, units)
        gather = Gather(param_dtype, None, roles)
        if found:
            module = _units.install(module, found, gather,
                                    _tensor_parallel.planned_params(tuple(plan), tp))
    if not found and param_dtype is not None:
        raise ValueError("fx.shard: param_dtype is how units gather, and this state is sharded "
                         "whole; pass units=... too (for example units='auto')")
    params = {k: distributed(p, mesh, _meshes.placements(p, roles, tp.get(k, (None,))[0]))
              for k, p in state.params.items()}
    state = _with_frozen(state, lambda k, b: distributed(
        b, mesh, _meshes.placements(b, roles, tp.get(k, (None,))[0])))
    logging.getLogger("fxtrain").info(
        "fx.shard: %s on a %s mesh %s, %s", "FSDP x tensor parallel" if tp else "HSDP",
        "x".join(map(str, mesh.shape)), mesh.mesh_dim_names,
        f"{len(found)} units" if found else "sharded whole")
    layout = _laid_out(state, mesh, roles, units=tuple(found), gather=gather,
                       planned=tuple(plan))
    return _with_params(state, module, layout, params, callbacks)


def _default_units(module: Any) -> list[str]:
    """``units=None``'s: the model's blocks where it has some that can be units and this torch
    compiles their gradients, else none (sharded whole); which, logged."""
    log = logging.getLogger("fxtrain")
    if not at_least(2, 13):
        log.info("fx.shard: sharding %s whole (per-block units need torch 2.13 or later to "
                 "compile)", type(module).__name__)
        return []
    try:
        found = _units.resolve(module, "auto")
    except ValueError as e:  # no blocks, or blocks that cannot be units
        log.info("fx.shard: sharding %s whole: %s", type(module).__name__, e)
        return []
    log.info("fx.shard: sharding %s per block: %s", type(module).__name__,
             _units.described(module, found))
    return found


def unit_names(state: Any) -> list[str]:
    """The qualified names of the units of a state sharded with ``fx.shard(state, units=...)``
    (its ``layout.units``), in module order; ``[]`` when it has none.

    Examples:
        >>> state = fx.TrainState.create(nn.Sequential(nn.Linear(2, 2)), fx.optim.sgd(0.1))
        >>> fx.sharding.unit_names(state)
        []
    """
    return list(state.layout.units)
