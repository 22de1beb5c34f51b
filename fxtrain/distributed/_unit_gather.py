"""A unit's parameters gathered in an eager step, as FSDP2 gathers them.

Uncompiled, a unit (``fxtrain.distributed._units``) gathers its ``Shard(0)`` parameters in one
all-gather of all its shards (each padded to the same rows, as FSDP2's flat buffer:
``_unit_buffer``), copied out into one whole tensor per parameter for its forward. What the
forward saves for the backward is kept as autograd keeps it, but for the gathered parameters
(the weight a matmul keeps, or a view of it): saved-tensor hooks keep where each sits instead of
the tensor, so the gathered parameters go as soon as the forward is done. The unit's first use
of one in the backward gathers the unit again; its last lets them go. The gather's backward is
one reduce-scatter of all the unit's gradients, run as soon as the unit's backward has produced
them (FSDP2's post-backward hook); when a unit gathers for its backward, it starts the gather of
the unit whose forward ran before it, whose backward comes next (FSDP2's backward prefetch: two
units' parameters at a time). A compiled step takes ``_units``' checkpointed region instead,
whose saved tensors Inductor picks by liveness.

On a 2-D mesh (``fxtrain.distributed._meshes``: FSDP x tensor parallel, HSDP) the gather runs
over the mesh's shard dimension only, each parameter along the tensor dimension it is split
there (moved first, as ``_meshes.value`` moves it); what comes out is its tensor-parallel shard,
which a planned parameter's layer takes as a DTensor on the tensor-parallel dimension. The
layer's ops then save DTensors whose local tensors are views of the gathered parameters: those
too are packed as where they sit (and their spec), and unpacked as DTensors again.

Measured on 2 gloo ranks (``benchmarks/fsdp2.py --profile``, a 4-block GPT-2 of width 512):
through the checkpointed region an eager step kept every output of the unit's forward (the
selective checkpoint's cache keeps what autograd would not), 23 MiB per block against FSDP2's
14, reran the forward's ops in the backward, and ran a collective per parameter. On a 2-D mesh
(``benchmarks/simulate.py``, Llama 3 70B, FSDP x TP 8x8 on 64 ranks) the region held 78 GiB of
activations per rank to FSDP2's 45.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

import torch

from .._torch.autograd import saved_tensors_hooks_active
from . import _meshes
from ._dtensors import is_dtensor
from ._layout import Roles
from ._unit_buffer import Issued, Plan


_LAST: contextvars.ContextVar[Any] = contextvars.ContextVar("fxtrain_last_unit", default=None)
"""A weak reference to the hooks of the unit whose forward ran last in this context: the
next unit's backward prefetches its gather (gone with its graph: nothing is kept across
steps)."""


class _Gather(torch.autograd.Function):
    """Shards in, whole parameters out; the backward reduce-scatters their gradients."""

    @staticmethod
    def forward(ctx: Any, plan: Plan, hooks: Regathered | None,
                *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.hooks, ctx.like = plan, hooks, [(s.shape[0], s.dtype) for s in shards]
        ctx.set_materialize_grads(False)  # an unused parameter's gradient: None, not zeros
        whole = tuple(plan.gathered(list(shards)))
        frozen = [w for w, needed in zip(whole, ctx.needs_input_grad[2:]) if not needed]
        if frozen:  # a LoRA base: autograd computes and holds no gradient for it
            ctx.mark_non_differentiable(*frozen)
        return whole

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        if ctx.hooks is not None:  # every gradient of the unit's parameters is in: done
            ctx.hooks.release()
        trained = [i for i, needed in enumerate(ctx.needs_input_grad[2:]) if needed]
        if len(trained) == len(grads):
            return (None, None, *ctx.plan.scattered(grads, ctx.like))
        out: list[torch.Tensor | None] = [None] * len(grads)  # frozen: nothing to send back
        if trained:
            scattered = ctx.plan.only(trained).scattered([grads[i] for i in trained],
                                                         [ctx.like[i] for i in trained])
            for i, g in zip(trained, scattered):
                out[i] = g
        return (None, None, *out)


class Regathered:
    """The saved-tensor hooks of a unit's forward (see the module): a gathered parameter, or a
    view of one, is packed as where it sits; the first unpack gathers the unit again, the last
    lets it go."""

    def __init__(self, plan: Plan, shards: list[torch.Tensor], before: Any = None):
        self.plan, self.shards = plan, shards
        self.before = before  # a weak reference to the unit whose forward ran before this one
        self.index: dict[int, int] = {}
        self.whole: list[torch.Tensor] | None = None
        self.issued: Issued | None = None  # its gather for the backward, started early
        self.packed = self.unpacked = 0

    def gathered(self, whole: tuple[torch.Tensor, ...]) -> None:
        """The forward's whole parameters: what ``pack`` recognizes, by their storage's object
        (torch keeps one per storage; alive through the forward, as ``whole`` is), not its
        address: storages without data (meta and fake tensors, which a simulated rank runs
        on) all have address 0, and every saved tensor was taken for a parameter."""
        self.index = {id(t.untyped_storage()): i for i, t in enumerate(whole)
                      if t.numel()}

    def release(self) -> None:
        """Lets the backward's gathered parameters go (the unit's gradients are all in, so no
        op of the unit that needs them is left; one whose output the loss does not use never
        unpacks, and would keep them until the graph goes)."""
        if self.issued is not None:  # started for a backward that did not come: waited for
            self.issued.wait()
        self.whole, self.index, self.issued = None, {}, None

    def prefetch(self) -> None:
        """Starts this unit's gather for its backward, if it is still to come (FSDP2's backward
        prefetch: the unit before runs its backward next, its gather under way meanwhile)."""
        if self.whole is None and self.issued is None and self.unpacked < self.packed:
            with torch.no_grad():
                self.issued = self.plan.issued(self.shards)

    def pack(self, x: torch.Tensor) -> Any:
        local = _local(x)
        try:
            i = self.index.get(id(local.untyped_storage()))
        except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
            return x
        if i is None:
            return x
        self.packed += 1
        spec = None if local is x else (x.device_mesh, tuple(x.placements), tuple(x.shape),
                                        x.stride())
        return self, (i, tuple(local.shape), local.stride(), local.storage_offset()), spec

    @staticmethod
    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        regathered, where, spec = saved
        view = regathered.take(*where)
        if spec is None:
            return view
        from torch.distributed.tensor import DTensor
        mesh, placements, shape, stride = spec
        with torch.no_grad():
            return DTensor.from_local(view, mesh, placements, run_check=False, shape=shape,
                                      stride=stride)

    def take(self, i: int, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
        if self.whole is None:
            with torch.no_grad():
                issued, self.issued = self.issued or self.plan.issued(self.shards), None
                self.whole = self.plan.copied_out(issued)
                del issued  # its buffer goes before the next unit's gather is started
            before = self.before() if self.before is not None else None
            if before is not None:
                before.prefetch()
        view = self.whole[i].as_strided(shape, stride, offset)
        self.unpacked += 1
        if self.unpacked == self.packed:
            self.release()
        return view


def _local(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (a view of it: the same storage), anything else as it is."""
    if not is_dtensor(x):
        return x
    with torch.no_grad():
        return x.to_local()


def applies(params: list[Any], gather: Any) -> bool:
    """Whether a unit of ``params`` (DTensors) gathers here: uncompiled, all on one mesh (1-D,
    each ``Shard(0)``; or 2-D, ``gather.roles`` saying which dimension shards, at least one of
    them split over it), float8 weights only where no saved-tensor hooks are in force around it
    (an activation-checkpointed region: ``FLOAT8_GATHER_REGION``; inside one, ``run`` gathers
    without hooks of its own), and nowhere a torch cannot say whether hooks are in force. One
    mesh by equality, not identity: DTensor's cache of its ops' output specs hands back an
    equal mesh object of an earlier op (seen after FSDP2 ran in the process).
    Parameters of two dtypes and no ``gather.param_dtype`` (a bfloat16 model with a norm kept
    in float32) are gathered each on its own, in its own dtype: one buffer would hold them in
    one dtype (FSDP2 gathers such a group as bytes, but refuses its gradients' reduce-scatter)."""
    from torch.distributed.tensor import Shard
    if torch.compiler.is_compiling() or len({p.device_mesh for p in params}) != 1:
        return False
    if gather.param_dtype is None and len({p.dtype for p in params}) != 1:
        return False
    if gather.roles is None:
        laid_out = all(p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)
                       and p.ndim >= 1 for p in params)
    else:
        laid_out = params[0].device_mesh.ndim == 2 and any(
            _meshes.shard_dim(p, gather.roles) is not None for p in params)
    hooks = saved_tensors_hooks_active()
    if hooks is None or (hooks and gather.float8):  # _units' checkpointed region, which nests
        return False
    return laid_out


def _along(params: list[Any], roles: Roles | None) -> tuple[Any, list[int | None]]:
    """The 1-D mesh a unit gathers over, and the tensor dimension each of ``params`` is split
    along there (None: whole there, not gathered)."""
    mesh = params[0].device_mesh
    if roles is None:
        return mesh, [0] * len(params)
    return _meshes.shard_mesh(mesh, roles), [_meshes.shard_dim(p, roles) for p in params]


def _moved(t: torch.Tensor, dim: int, back: bool = False) -> torch.Tensor:
    """``t`` with its dimension ``dim`` moved first (``back``: from first to ``dim``)."""
    if dim == 0:
        return t
    return t.movedim(0, dim) if back else t.movedim(dim, 0)


def _values(params: list[Any], dims: list[int | None], planned: list[bool], gather: Any,
            whole: tuple[torch.Tensor, ...]) -> list[Any]:
    """What the unit computes with: on a 1-D mesh the ``whole`` parameters; on a 2-D one
    ``_meshes.computed`` of each (moved back; one whole there: ``_meshes.value``)."""
    if gather.roles is None:
        return list(whole)
    rest = iter(whole)
    return [_meshes.value(p, gather.roles, k, gather.param_dtype) if d is None else
            _meshes.computed(_moved(next(rest), d, back=True), p, gather.roles, k)
            for p, d, k in zip(params, dims, planned)]


def run(forward: Any, params: list[Any], planned: list[bool], gather: Any, bind: Any,
        ready: dict[int, torch.Tensor] | None = None) -> Any:
    """``forward()`` inside ``bind(values)`` (the unit's module bound to what it computes
    with), ``params``' shards gathered as the module says (``planned``: those a
    tensor-parallel plan splits, on a 2-D mesh), but for those ``ready`` has gathered already
    (by index: the float8 weights, ``fxtrain.distributed._float8_gather``; 1-D meshes).

    Inside an activation-checkpointed region (saved-tensor hooks in force: transformers'
    gradient checkpointing, ``fx.remat``) the unit keeps no hooks of its own, which would hide
    the tensors the region's hooks must see: the region holds none of what the forward saves,
    the gathered parameters included, and its rerun in the backward gathers them again (each
    unit's gather runs twice, its reduce-scatter once). Through ``_units``' checkpointed region
    instead, nested in the outer one, the unit's cache kept every output of its forward, in the
    forward and again in the rerun: a 2-layer Llama of width 128, 2 gloo ranks, 2048 tokens,
    with transformers' gradient checkpointing: 75.0 MB of activations at the step's peak
    against 47.6 without checkpointing, and an all-gather per parameter. Any saved-tensor
    hooks count (``torch.autograd.graph.save_on_cpu`` too: the gathered parameters the forward
    saves are then copied to the host with the activations, as an unsharded model's are)."""
    ready = ready or {}
    values: list[Any] = [ready.get(i) for i in range(len(params))]
    high = [i for i in range(len(params)) if i not in ready]
    if not high:
        with bind(values):
            return forward()
    rest = [params[i] for i in high]
    mesh, dims = _along(rest, gather.roles)
    took = [(p, d) for p, d in zip(rest, dims) if d is not None]
    shards = [_moved(p.to_local(), d) for p, d in took]  # the gathered dimension first
    plan = Plan(mesh, tuple((p.shape[d], *s.shape[1:]) for (p, d), s in zip(took, shards)),
                gather.param_dtype, gather.reduce_dtype)

    def bound(whole):
        computed = _values(rest, dims, [planned[i] for i in high], gather, whole)
        for i, v in zip(high, computed):
            values[i] = v
        return bind(values)

    if not torch.is_grad_enabled() or saved_tensors_hooks_active():  # no backward, or a region's
        with bound(_Gather.apply(plan, None, *shards)):
            return forward()
    hooks = Regathered(plan, [s.detach() for s in shards], _LAST.get())
    _LAST.set(weakref.ref(hooks))
    whole = _Gather.apply(plan, hooks, *shards)
    hooks.gathered(whole)
    with bound(whole), torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return forward()
