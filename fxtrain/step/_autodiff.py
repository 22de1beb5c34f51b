"""How a train step takes its gradients: ``torch.func.grad_and_value`` or autograd traced into
the graph (``differentiate``), and which of the two a state's layout needs (``resolved``). How
the gradients then become the same on every rank is the layout's gradient path
(``fxtrain.distributed``'s ``strategy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import grad_and_value

from .. import _held, random
from ..distributed import Layout, is_dtensor
from .._torch import recompute as _recompute
from .._torch import autograd as torch_autograd
from .._torch import version
from .._torch.traced_errors import fail

AUTODIFFS = ("auto", "func", "autograd")
"""How a train step takes its gradients (``make_train_step(..., autodiff=...)``)."""


def resolved(autodiff: str, layout: Layout) -> str:
    """How a step on a state of ``layout`` takes its gradients: ``"auto"`` is ``"autograd"``
    where the layout needs it (per-block units, which gather inside the forward and again in
    the backward; a tensor-parallel plan, whose DTensors torch.func cannot differentiate; a 2-D
    mesh, whose gathers are in the forward; the model's own activation checkpointing:
    ``Layout.needs_autograd``), else ``"func"``."""
    if autodiff != "auto":
        return autodiff
    return "autograd" if layout.needs_autograd else "func"


def differentiate(compute: Callable, autodiff: str, on_grad: Callable | None = None,
                  recompute: bool = True, reused: bool = False,
                  around: Callable | None = None) -> Callable:
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
      ``reused`` (autograd only): the forward calls regions whose trace Dynamo may reuse
      (``fx.regional``): a reused call's outputs have no autograd history while Dynamo traces
      (torch makes them anew), so Dynamo cannot tell which gradients are None; compiled, every
      gradient is then the graph's (an unused parameter's zeros, ``materialize_grads``), and
      only ``_depending`` refuses a loss that does not depend on the parameters.
      ``around`` (autograd only): ``around(fn, leaves)`` runs the forward and the backward
      (``fn(leaves)``) inside a context of the caller's (the step's keyed randomness); the
      leaves are made outside it, so a mode of that context does not see a
      ``detach``/``requires_grad_`` per parameter (Dynamo traces the mode's handler for each
      call: 2.3 of the 13.5 CPU-s of a 24-layer GPT-2's trace).

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
        with torch.enable_grad():
            leaves = torch_autograd.leaves(params)
        if on_grad is not None:
            for leaf in leaves.values():
                leaf.register_hook(on_grad)
        return around(of_leaves, leaves) if around is not None else of_leaves(leaves)

    def of_leaves(leaves: dict) -> tuple[dict, Any]:
        with torch.enable_grad():
            if torch.compiler.is_compiling():  # traced as is: recomputation is the graph's own
                if not version.at_least(2, 13) and any(map(is_dtensor, leaves.values())):
                    version.require(SHARDED_AUTOGRAD, 2, 13, SHARDED_AUTOGRAD_INSTEAD)
                value, aux = compute(leaves)
                with _recompute.backward_marked():  # where checkpointed regions recompute
                    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True,
                                                materialize_grads=reused)
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
