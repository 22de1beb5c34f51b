"""The gradient path of a train step by layout, one object per way of training: what the
forward sees, and how gradients, the loss and the metrics become the same on every rank.

- ``SingleProcess``: the parameters as they are, nothing to reduce.
- ``DataParallel``: whole parameters on every rank; gradients, the loss, the aux metrics (and
  floating-point buffers, with ``mean_buffers``) averaged over the ranks in one functional
  all-reduce per dtype, so every rank takes the same update and decides alike.
- ``Sharded``: parameters sharded across the ranks (``fx.shard``), each gradient averaged
  onto this rank's shard (reduce-scatter), and the gradient norms (with the non-finite count)
  summed over the ranks in the all-reduce that averages the loss, so no collective more (see
  ``fxtrain.distributed._collectives``). With ``torch.func`` the parameters are gathered whole
  before the forward and the whole gradients reduce-scattered after it. With autograd the
  gradients are taken with respect to the shards themselves: the forward gathers them
  (``state.apply`` the parameters outside units, each unit its own just before its forward:
  ``fxtrain.distributed._units``), and the gathers' backward reduce-scatters each gradient as
  soon as it is ready.
- ``TensorParallel``: a plan's DTensors run as they are.

Each has the same methods, ``whole(params)``, ``recomputes()``, ``reduce(...)`` and
``metrics(metrics)``, and an ``on_grad`` for the autograd path (what each gradient goes
through as the backward produces it), so the step reads as one line of work whatever the
strategy. ``strategy(layout, ...)`` looks the step's up from the state's ``Layout``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .._torch.traced_errors import fail
from . import _collectives, _ranks
from ._dtensors import gather_tensor, is_dtensor
from ._layout import Layout, Roles


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
    whole = [k for k, g in grads.items() if not is_dtensor(g)]
    tensors = [*(grads[k] for k in whole), loss, *(aux[k] for k in float_aux),
               *(buffers[k] for k in float_bufs), *sums]
    means = iter(_ranks.mean_in_step(tensors))
    grads = {**grads, **{k: next(means) for k in whole}}
    loss = next(means)
    aux = {**aux, **{k: next(means) for k in float_aux}}
    buffers = {**buffers, **{k: next(means) for k in float_bufs}}
    sums = [next(means) * _ranks.world_size() for _ in sums]
    return grads, loss, aux, buffers, sums


class SingleProcess:
    """One process: the parameters as they are, nothing to reduce."""

    on_grad = None  # what each gradient goes through as the backward produces it

    def whole(self, params: dict) -> dict:
        """The parameters the gradients are taken with respect to."""
        return params

    def recomputes(self) -> bool:
        """Whether the step's backward redoes the forward's cheap work
        (``fxtrain._torch.recompute``) instead of keeping it."""
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
            return _ranks.summed
        return None

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        del params
        grads = _unscaled(grads, scale)
        if self.autodiff == "autograd":  # each gradient summed over the ranks on its own
            if self.on_grad is None:  # compiled: here (see on_grad); eager: in the backward
                grads = {k: _ranks.summed(g) for k, g in grads.items()}
            world = _ranks.world_size()
            grads = {k: g / world for k, g in grads.items()}
            _, loss, aux, buffers, _ = _rank_means({}, loss, aux, buffers, self.mean_buffers)
        else:
            grads, loss, aux, buffers, _ = _rank_means(grads, loss, aux, buffers,
                                                       self.mean_buffers)
        return Reduced(grads, loss, aux, buffers,
                       finite=_all_finite(grads) if check_finite else None)


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Sharded parameters (see the module) of ``layout``; ``parallel``: several ranks train (a
    sharded state restored in one process has one); ``autodiff``: the step's."""

    layout: Layout
    parallel: bool = True
    mean_buffers: bool = True
    autodiff: str = "func"

    on_grad = None

    def whole(self, params: dict) -> dict:
        """The parameters the gradients are taken with respect to: with ``torch.func`` the
        whole ones (gathered here), with autograd the shards (the forward gathers them)."""
        if self.autodiff == "autograd":
            return params
        if self.layout.two_dimensional:
            fail(ValueError,
                 "a state sharded on a 2-D mesh (FSDP x tensor parallel, HSDP) gathers its "
                 "parameters inside the forward, on autograd's path: build the step with "
                 "fx.make_train_step(loss_fn) (autodiff 'auto' takes it) or autodiff='autograd'")
        if self.layout.units:
            fail(ValueError,
                 "fx.shard's per-block units gather their parameters inside the forward and "
                 "again in the backward, which torch.func cannot host (it refuses activation "
                 "checkpointing): build the step with fx.make_train_step(loss_fn) (autodiff "
                 "'auto' takes autograd here) or autodiff='autograd', or shard the whole model "
                 "with fx.shard(state, units='whole')")
        return _collectives.gather_params(params)

    def recomputes(self) -> bool:
        """Not with per-block units: their forward regions are checkpointed (the gather is
        redone for the backward), and the pass's copies kept more of each block alive than the
        block's own saved tensors (GPT-2 units on 2 ranks: 8.7 bytes per parameter at the
        step's peak with the pass against 7.7 without, ``benchmarks/scale.py``)."""
        return not self.layout.units

    @property
    def roles(self) -> Roles | None:
        """A 2-D mesh's roles (the gradients' reduction over it); None on a 1-D mesh."""
        return self.layout.roles if self.layout.two_dimensional else None

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        grads = _unscaled(_collectives.reduce_scatter_grads(grads, params, self.roles), scale)
        parts = _collectives.local_parts(grads, finite=check_finite)  # summed over the ranks below
        if self.parallel:
            grads, loss, aux, buffers, parts = _rank_means(grads, loss, aux, buffers,
                                                           self.mean_buffers, sums=parts)
        grads = _collectives.replicated_like(grads, params)
        return Reduced(grads, loss, aux, buffers, squared=parts[:len(grads)],
                       finite=parts[-1] == 0 if check_finite else None)

    def metrics(self, metrics: dict) -> dict:
        """Any DTensor left (a norm taken another way) reduced into a plain tensor."""
        return {k: gather_tensor(v) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class TensorParallel(SingleProcess):
    """A tensor-parallel plan's DTensors (``fxtrain.distributed._tensor_parallel``): the forward runs them
    as they are, and autograd gives each gradient in its parameter's placement, complete (the
    ranks of the group run on one batch: nothing to average); norms of DTensor gradients
    reduce over the ranks by themselves. A parameter whole on every rank that meets
    activations split over them (a norm's weight under ``SequenceParallel``) gets each rank's
    part of its gradient (``Partial``): summed here into its parameter's ``Replicate``, so
    the optimizer state keeps the parameters' placements (kept ``Partial``, every step's
    optimizer redistributed it again, and a compiled step recompiled on the state's new
    placements)."""

    def reduce(self, grads: dict, loss: torch.Tensor, aux: dict, buffers: dict, params: dict,
               scale: torch.Tensor | None = None, check_finite: bool = False) -> Reduced:
        grads = {k: _placed_like(g, params[k]) for k, g in grads.items()}
        return super().reduce(grads, loss, aux, buffers, params, scale, check_finite)

    def metrics(self, metrics: dict) -> dict:
        return {k: gather_tensor(v) for k, v in metrics.items()}


def _placed_like(grad: Any, param: Any) -> Any:
    """``grad`` in ``param``'s placements (a DTensor's partial sums summed)."""
    if not is_dtensor(grad) or tuple(grad.placements) == tuple(param.placements):
        return grad
    return grad.redistribute(param.device_mesh, param.placements)


def strategy(layout: Layout, autodiff: str, parallel: bool, mean_buffers: bool
             ) -> SingleProcess | Sharded:
    """The gradient path of a step on a state of ``layout``, taking its gradients by
    ``autodiff`` (resolved), on several ranks (``parallel``: data parallel was asked for, or
    left to the process group) or one: a lookup of the layout, made while the step is traced
    (the state's layout is static: each layout its own graph)."""
    parallel = parallel and layout.gradient_world_size() > 1
    if layout.tensor_parallel and not layout.two_dimensional:
        if autodiff == "func":
            fail(ValueError, "a tensor-parallel state (fx.shard(tp_plan=...)) trains on the "
                             "autograd path: build the step with fx.make_train_step(loss_fn) "
                             "or autodiff='autograd'")
        if parallel:
            fail(ValueError, "a tensor-parallel state trains without data parallelism beside "
                             "it on a 1-D mesh: shard it on a 2-D mesh (FSDP x tensor "
                             "parallel) for both")
        return TensorParallel()
    if layout.sharded:
        return Sharded(layout, parallel, mean_buffers, autodiff)
    return DataParallel(mean_buffers, autodiff) if parallel else SingleProcess()
