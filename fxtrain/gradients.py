"""The gradient path of a train step, one object per way of training: what the forward sees,
and how gradients, the loss and the metrics become the same on every rank.

- ``SingleProcess``: the parameters as they are, nothing to reduce.
- ``DataParallel``: whole parameters on every rank; gradients, the loss, the aux metrics (and
  floating-point buffers, with ``mean_buffers``) averaged over the ranks in one functional
  all-reduce per dtype, so every rank takes the same update and decides alike.
- ``Sharded``: parameters sharded across the ranks (``fx.shard``), each gradient averaged
  onto this rank's shard (reduce-scatter), and the gradient norms (with the non-finite count)
  summed over the ranks in the all-reduce that averages the loss, so no collective more (see
  ``fxtrain.sharding``). With ``torch.func`` the parameters are gathered whole before the
  forward and the whole gradients reduce-scattered after it. With autograd the gradients are
  taken with respect to the shards themselves: the forward gathers them (``state.apply`` the
  parameters outside units, each unit its own just before its forward: ``fxtrain.units``),
  and the gathers' backward reduce-scatters each gradient as soon as it is ready.

Each has the same methods, ``whole(params, module)``, ``recomputes(module)``, ``reduce(...)``
and ``metrics(metrics)``, and an ``on_grad`` for the autograd path (what each gradient goes
through as the backward produces it), so the step reads as one line of work whatever the
strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import grad_and_value

from . import _held, distributed, meshes, random, sharding, tensor_parallel, units
from ._torch import recompute as _recompute
from ._torch import autograd as torch_autograd
from ._torch import version
from ._torch.traced_errors import fail

AUTODIFFS = ("auto", "func", "autograd")
"""How a train step takes its gradients (``make_train_step(..., autodiff=...)``)."""


def resolved(autodiff: str, module: Any) -> str:
    """The gradient path of a step on a state whose module is ``module``: ``"auto"`` is
    ``"autograd"`` where the module needs it (per-block units, which gather inside the forward
    and again in the backward; a tensor-parallel plan, whose DTensors torch.func cannot
    differentiate; a 2-D mesh, whose gathers are in the forward; the model's own activation
    checkpointing), else ``"func"``."""
    if autodiff != "auto":
        return autodiff
    needs = units.has_units(module) or tensor_parallel.is_tensor_parallel(module) or \
        meshes.roles_of(module) is not None or getattr(module, _held.CHECKPOINTING, False)
    return "autograd" if needs else "func"


def differentiate(compute: Callable, autodiff: str, on_grad: Callable | None = None,
                  recompute: bool = True) -> Callable:
    """``compute(params) -> (value, aux)`` made into ``params -> (grads, (value, aux))``.

    - ``"func"``: ``torch.func.grad_and_value``, a transform of ``compute``.
    - ``"autograd"``: ``torch.autograd.grad`` over fresh leaves detached from ``params``, which
      ``torch.compile`` traces into the step's graph as it is (``fxtrain._torch.autograd``);
      it runs the saved-tensor hooks that activation checkpointing needs (``fx.remat``,
      ``torch.utils.checkpoint``). Eager, ``compute`` runs inside ``fxtrain._held.holding()``,
      so a region rerun in the backward finds the step's tensors in the module. Same
      gradients: an unused parameter's is zeros, the value and the aux come back detached.
      ``on_grad`` (autograd only) is a hook on each
      leaf: it gets each gradient as soon as the backward has produced it (data parallel's
      all-reduce, under way while the rest of the backward runs).

    Compiled, with ``recompute``, the forward's cheap work is done again in the backward
    instead of kept (``fxtrain._torch.recompute``).
    """
    if recompute:
        compute = _recompute.marked(compute)
    compute = _depending(compute)
    if autodiff == "func":
        transformed = grad_and_value(compute, has_aux=True)

        def func_grads(params: dict) -> tuple[dict, Any]:
            with torch.no_grad():  # nothing outside the transform needs a graph, and inside it
                return transformed(params)  # only what depends on params then requires grad

        return func_grads

    def value_and_grads(params: dict) -> tuple[dict, Any]:
        leaves = torch_autograd.leaves(params)
        if on_grad is not None:
            for leaf in leaves.values():
                leaf.register_hook(on_grad)
        with torch.enable_grad():
            if torch.compiler.is_compiling():  # traced as is: recomputation is the graph's own
                if not version.at_least(2, 13) and any(map(sharding.is_dtensor, params.values())):
                    version.require(SHARDED_AUTOGRAD, 2, 13, SHARDED_AUTOGRAD_INSTEAD)
                value, aux = compute(leaves)
                with _recompute.backward_marked():  # where checkpointed regions recompute
                    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
            else:
                with _held.holding():  # the module keeps the step's tensors for the backward
                    value, aux = compute(leaves)
                    grads = _eager_grads(value, list(leaves.values()))
        if all(g is None for g in grads):  # known while tracing: Dynamo follows the graph
            fail(ValueError, NO_DEPENDENCE)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves.values())]
        out = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (value, aux))
        return dict(zip(leaves, grads)), out

    return value_and_grads


SHARDED_AUTOGRAD = ("a compiled step on the autograd path with sharded parameters (fx.shard with "
                    "per-block units, or make_train_step(..., autodiff='autograd'))")
SHARDED_AUTOGRAD_INSTEAD = (
    "Its Dynamo cannot take torch.autograd.grad with respect to DTensors. Train the step "
    "uncompiled, or shard the whole model (fx.shard(state, units='whole')) with "
    "make_train_step(loss_fn), which compiles on this torch")

NO_DEPENDENCE = (
    "loss_fn's loss does not depend on params, so every gradient is zero and nothing trains. "
    "Run the model with the parameters the step passes: state.apply(params, *inputs), not the "
    "original module (model(x) runs the weights it had when TrainState.create copied them, "
    "which the step neither reads nor updates)")


def _depending(compute: Callable) -> Callable:
    """``compute`` refusing a value that does not depend on its ``params`` (``torch.func``'s
    transform would give zero gradients silently, autograd too where the module's own weights
    require grad). Under ``differentiate``'s ``no_grad`` only what ``torch.func`` tracks
    requires grad, eagerly and while Dynamo traces; autograd's ``grad`` then finds no
    parameter in the graph (also known while tracing)."""

    def checked(params: dict) -> tuple[torch.Tensor, Any]:
        value, aux = compute(params)
        if not value.requires_grad:
            fail(ValueError, NO_DEPENDENCE)
        return value, aux

    return checked


def _eager_grads(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """What ``torch.autograd.grad(value, leaves, allow_unused=True)`` gives (None for an unused
    leaf), from autograd's engine called as ``grad`` calls it but without its torch-function
    dispatch: with a mode active (the step's ``fx.random.keyed``), ``grad`` and ``backward``
    hand the call to the mode, which runs it with itself popped, so checkpointed regions rerun
    in the backward would draw from torch's generator instead of the step's key."""
    try:
        grads = torch_autograd.engine_grads(value, leaves)
    except RuntimeError as e:  # torch.utils.checkpoint(use_reentrant=True) recomputing
        if "use_reentrant=True" not in str(e) and "Checkpointing is not compatible" not in str(e):
            raise
        raise ValueError(random.REENTRANT) from e
    return list(grads)


@dataclasses.dataclass(frozen=True)
class Reduced:
    """A step's gradients, loss, aux metrics and buffers after the strategy's reduction, with
    the squared gradient norms when the strategy computed them (None: compute them from
    ``grads``) and whether every gradient is finite (None unless asked)."""

    grads: dict[str, Any]
    loss: torch.Tensor
    aux: dict[str, Any]
    buffers: dict[str, Any]
    squared: list[torch.Tensor] | None = None
    finite: torch.Tensor | None = None


def _unscaled(grads: dict, scale: torch.Tensor | None) -> dict:
    """Gradients of a scaled loss, unscaled before anything reads them (clipping included)."""
    return grads if scale is None else {k: g / scale for k, g in grads.items()}


def _all_finite(grads: dict) -> torch.Tensor:
    return torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()


def _rank_means(grads: dict, loss, aux: dict, buffers: dict, mean_buffers: bool,
                sums: list = ()):
    """Gradients, loss and aux averaged over ranks in one functional all-reduce per dtype
    (and float buffers when ``mean_buffers``): every rank then takes the same update and sees
    the same metrics, so in-step callbacks decide alike everywhere. Gradients already averaged
    onto their shards (DTensors) are left as they are; ``sums`` (float32 0-d tensors) ride
    along and come back summed over the ranks."""
    aux = {k: torch.as_tensor(v) for k, v in aux.items()}
    float_aux = [k for k, v in aux.items() if v.is_floating_point()]
    float_bufs = [k for k, v in buffers.items() if mean_buffers and v.is_floating_point()]
    whole = [k for k, g in grads.items() if not sharding.is_dtensor(g)]
    tensors = [*(grads[k] for k in whole), loss, *(aux[k] for k in float_aux),
               *(buffers[k] for k in float_bufs), *sums]
    means = iter(distributed.mean_in_step(tensors))
    grads = {**grads, **{k: next(means) for k in whole}}
    loss = next(means)
    aux = {**aux, **{k: next(means) for k in float_aux}}
    buffers = {**buffers, **{k: next(means) for k in float_bufs}}
    sums = [next(means) * distributed.world_size() for _ in sums]
    return grads, loss, aux, buffers, sums


class SingleProcess:
    """One process: the parameters as they are, nothing to reduce."""

    on_grad = None  # what each gradient goes through as the backward produces it

    def whole(self, params: dict, module: Any) -> dict:
        del module
        return params

    def recomputes(self, module: Any) -> bool:
        """Whether the step's backward redoes the forward's cheap work
        (``fxtrain._torch.recompute``)
        instead of keeping it."""
        del module
        return True

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        del params  # the gradients are whole already
        grads = _unscaled(grads, scale)
        return Reduced(grads, loss, aux, buffers,
                       finite=_all_finite(grads) if check_finite else None)

    def metrics(self, metrics: dict) -> dict:
        return metrics


@dataclasses.dataclass(frozen=True)
class DataParallel(SingleProcess):
    """Whole parameters on every rank, averaged gradients (see the module). With autograd each
    gradient is summed over the ranks on its own, as soon as it is ready, while the rest of the
    backward runs (see ``on_grad``); with ``torch.func`` all of them after it, in one all-reduce
    per dtype."""

    mean_buffers: bool = True
    autodiff: str = "func"

    @property
    def on_grad(self) -> Callable | None:
        """Eager autograd: each gradient's all-reduce, issued from a hook on its leaf as soon as
        the backward has produced it. Compiled, no hook: the all-reduces follow the backward in
        the program, and Inductor issues each right after the kernel that computes its
        gradient and waits for them at the end (a hook registered inside a compiled step made
        Dynamo lose the keyed stream's position: other dropout masks than eager's)."""
        if self.autodiff == "autograd" and not torch.compiler.is_compiling():
            return distributed.summed
        return None

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        del params
        grads = _unscaled(grads, scale)
        if self.autodiff == "autograd":  # each gradient summed over the ranks on its own
            if self.on_grad is None:  # compiled: here (see on_grad); eager: in the backward
                grads = {k: distributed.summed(g) for k, g in grads.items()}
            world = distributed.world_size()
            grads = {k: g / world for k, g in grads.items()}
            _, loss, aux, buffers, _ = _rank_means({}, loss, aux, buffers, self.mean_buffers)
        else:
            grads, loss, aux, buffers, _ = _rank_means(grads, loss, aux, buffers,
                                                       self.mean_buffers)
        return Reduced(grads, loss, aux, buffers,
                       finite=_all_finite(grads) if check_finite else None)


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Sharded parameters (see the module); ``parallel``: several ranks train (a sharded state
    restored in one process has one); ``autodiff``: the step's."""

    parallel: bool = True
    mean_buffers: bool = True
    autodiff: str = "func"
    roles: Any = None  # a 2-D mesh's (fxtrain.meshes.Roles); None: a 1-D one

    on_grad = None

    def whole(self, params: dict, module: Any) -> dict:
        """The parameters the gradients are taken with respect to: with ``torch.func`` the
        whole ones (gathered here), with autograd the shards (the forward gathers them)."""
        if self.autodiff == "autograd":
            return params
        if meshes.roles_of(module) is not None:
            raise ValueError(
                "a state sharded on a 2-D mesh (FSDP x tensor parallel, HSDP) gathers its "
                "parameters inside the forward, on autograd's path: build the step with "
                "fx.make_train_step(loss_fn) (autodiff 'auto' takes it) or autodiff='autograd'")
        if units.has_units(module):
            raise ValueError(
                "fx.shard's per-block units gather their parameters inside the forward and "
                "again in the backward, which torch.func cannot host (it refuses activation "
                "checkpointing): build the step with fx.make_train_step(loss_fn) (autodiff "
                "'auto' takes autograd here) or autodiff='autograd', or shard the whole model "
                "with fx.shard(state, units='whole')")
        return sharding.gather_params(params)

    def recomputes(self, module: Any) -> bool:
        """Not with per-block units: their forward regions are checkpointed (the gather is
        redone for the backward), and the pass's copies kept more of each block alive than the
        block's own saved tensors (GPT-2 units on 2 ranks: 8.7 bytes per parameter at the
        step's peak with the pass against 7.7 without, ``benchmarks/scale.py``)."""
        return not units.has_units(module)

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        grads = _unscaled(sharding.reduce_scatter_grads(grads, params, self.roles), scale)
        parts = sharding.local_parts(grads, finite=check_finite)  # summed over the ranks below
        if self.parallel:
            grads, loss, aux, buffers, parts = _rank_means(grads, loss, aux, buffers,
                                                           self.mean_buffers, sums=parts)
        grads = sharding.replicated_like(grads, params)
        return Reduced(grads, loss, aux, buffers, squared=parts[:len(grads)],
                       finite=parts[-1] == 0 if check_finite else None)

    def metrics(self, metrics: dict) -> dict:
        """Any DTensor left (a norm taken another way) reduced into a plain tensor."""
        return {k: sharding.gather_tensor(v) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class TensorParallel(SingleProcess):
    """A tensor-parallel plan's DTensors (``fxtrain.tensor_parallel``): the forward runs them
    as they are, and autograd gives each gradient in its parameter's placement, complete (the
    ranks of the group run on one batch: nothing to average); norms of DTensor gradients
    reduce over the ranks by themselves."""

    def metrics(self, metrics: dict) -> dict:
        return {k: sharding.gather_tensor(v) for k, v in metrics.items()}


def chooser(parallel: bool, mean_buffers: bool
            ) -> Callable[[dict, str, Any], SingleProcess | Sharded]:
    """``choose(params, autodiff, module)``: the strategy for a step on ``params``, sharded,
    tensor parallel or whole, on several ranks (``parallel``) or one, taking its gradients by
    ``autodiff`` (resolved). The strategies are made here, when the step is built; the choice
    is made while the step is traced (a state is sharded or not, and how)."""
    plain = {a: DataParallel(mean_buffers, a) if parallel else SingleProcess()
             for a in ("func", "autograd")}
    sharded = {a: Sharded(parallel, mean_buffers, a) for a in ("func", "autograd")}
    split = TensorParallel()

    def choose(params: dict, autodiff: str, module: Any) -> SingleProcess | Sharded:
        roles = meshes.roles_of(module)
        if roles is not None:  # 2-D: sharded on one dimension, replicated or split on the other
            return dataclasses.replace(sharded[autodiff], roles=roles)
        if tensor_parallel.is_tensor_parallel(module):
            if autodiff == "func":
                fail(ValueError, "a tensor-parallel state (fx.shard(tp_plan=...)) trains on "
                                 "the autograd path: build the step with "
                                 "fx.make_train_step(loss_fn) or autodiff='autograd'")
            if parallel:
                fail(ValueError, "a tensor-parallel state trains without data parallelism "
                                 "beside it for now: build the step after fx.shard(state, "
                                 "tp_plan=...), or with data_parallel=False")
            return split
        return (sharded if sharding.is_sharded(params) else plain)[autodiff]

    return choose
