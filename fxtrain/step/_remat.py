"""Activation checkpointing inside a train step, in the spirit of ``jax.checkpoint``.

``fx.remat(fn, *args, policy=...)`` calls ``fn(*args)`` inside ``loss_fn`` and, by the policy,
keeps its activations for the backward or drops them and computes them again there
(``torch.utils.checkpoint``, non-reentrant). It needs a step whose gradients come from
``torch.autograd.grad`` (``make_train_step(..., autodiff="autograd")``): ``torch.func``, the
default path, refuses the saved-tensor hooks checkpointing runs on.

Randomness stays keyed, and recomputing it draws the same masks by construction: the region
takes one key from the step's stream and runs ``fn`` under its own keyed context from it, in the
forward and again in the recompute. So a region's draws do not depend on the policy: with
``"everything_saveable"`` (nothing recomputed) the step is the same computation as with
``"nothing_saveable"``, which is how a run with and one without recomputation compare; a region
draws other masks than the same ``fn`` called outside ``remat``.

Policies, named as JAX names them:

- ``"nothing_saveable"``: keep only the region's inputs and the outputs of the fused attention
  kernels ``F.scaled_dot_product_attention`` runs; recompute everything else in the backward
  (the least memory, one more forward of the region). The attention kernels are kept because
  torch tags them random (they take a dropout probability, even at 0), and a compiled step's
  recomputation refuses random ops; their output is one activation of the block's width (plus
  a float per row), and their forward would cost the most to recompute. With dropout, SDPA
  runs as its math under keyed randomness and is recomputed like the rest.
- ``"dots_saveable"``: keep the outputs of matrix products (``mm``, ``addmm``, ``bmm``,
  ``baddbmm``, attention), recompute the cheap element-wise work around them (torch's selective
  activation checkpointing).
- ``"everything_saveable"``: keep every activation, recompute nothing (no checkpointing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import random
from .._torch import ops
from .._torch.inductor import keep_recomputation_in_the_backward
from .._torch.modes import innermost_mode
from .._torch.traced_errors import fail

POLICIES = ("nothing_saveable", "dots_saveable", "everything_saveable")
"""The recomputation policies ``remat`` takes (see ``fx.remat``)."""


@functools.cache
def _dots() -> frozenset:
    aten = torch.ops.aten
    return frozenset((aten.mm.default, aten.addmm.default, aten.bmm.default,
                      aten.baddbmm.default)) | ops.attention()


def _save_dots(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return (CheckpointPolicy.MUST_SAVE if op in _dots() else
            CheckpointPolicy.PREFER_RECOMPUTE)


def _save_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return (CheckpointPolicy.MUST_SAVE if op in ops.attention() else
            CheckpointPolicy.PREFER_RECOMPUTE)


_SAVED = {"nothing_saveable": _save_attention, "dots_saveable": _save_dots}


_HOST_READS = {torch.Tensor.item: ".item()", torch.Tensor.tolist: ".tolist()",
               torch.Tensor.__bool__: "bool(tensor)", torch.Tensor.__int__: "int(tensor)",
               torch.Tensor.__float__: "float(tensor)", torch.Tensor.__index__: "an index",
               torch.Tensor.numpy: ".numpy()"}


class _NoHostReads(TorchFunctionMode):
    """Refuses reading a tensor's value on the host inside a remat region: a value the Python
    code branches on could differ when the region is recomputed (and a compiled step never
    syncs with the host)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            fail(ValueError, f"fx.remat: the region reads a tensor's value on the host "
                             f"({_HOST_READS[func]}); its recomputation in the backward must "
                             "run as its forward ran, so keep it tensor-only (torch.where "
                             "instead of if, a 0-d tensor instead of a Python number)")
        return func(*args, **(kwargs or {}))


def _keyed_mode() -> random.keyed | None:
    """The innermost keyed context (the train step's), or None outside a step."""
    return innermost_mode(random.keyed)


def remat(fn: Callable, *args: Any, policy: str = "nothing_saveable", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its activations kept or recomputed in the backward by ``policy``.

    Use it on any call inside ``loss_fn``: a submodule (``fx.remat(block, h)``, in a model's
    ``forward`` too), or a function that takes the tensors it differentiates as arguments
    (``fx.remat(lambda h: state.apply(params, h), x)``). The recompute runs in the backward,
    after ``state.apply`` has returned, so a function must not reach a module's parameters
    any other way. Outside a train step, or where no gradient is taken, it calls ``fn``
    plainly.

    Examples:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(
        ...             nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.1)) for _ in range(2))
        ...     def forward(self, h):
        ...         for block in self.blocks:
        ...             h = fx.remat(block, h)  # its activations recomputed in the backward
        ...         return h
        >>> def loss_fn(state, params, batch):
        ...     return state.apply(params, batch).square().mean()
        >>> state = fx.TrainState.create(Net(), fx.optim.sgd(0.1), seed=0)
        >>> step = fx.make_train_step(loss_fn, autodiff="autograd")
        >>> new, metrics = step(state, torch.randn(4, 8))
        >>> int(new.step), metrics["loss"].shape
        (1, torch.Size([]))
        >>> fx.make_train_step(loss_fn)(state, torch.randn(4, 8))
        Traceback (most recent call last):
        ...
        ValueError: fx.remat: this train step takes its gradients with torch.func, which cannot
        recompute activations (it refuses the saved-tensor hooks checkpointing uses); build it
        with fx.make_train_step(loss_fn, autodiff='autograd')
    """
    if policy not in POLICIES:  # fail: the error itself, from a compiled step too
        fail(ValueError, f"fx.remat: unknown policy {policy!r}; choose one of "
                         f"{', '.join(POLICIES)} (named as jax.checkpoint's policies)")
    outer = _keyed_mode()
    if outer is None or not torch.is_grad_enabled():  # no step, or no gradient: nothing to save
        return fn(*args, **kwargs)
    if outer.autodiff != "autograd":
        fail(ValueError, "fx.remat: this train step takes its gradients with torch.func, which "
                         "cannot recompute activations (it refuses the saved-tensor hooks "
                         "checkpointing uses); build it with fx.make_train_step(loss_fn, "
                         "autodiff='autograd')")
    if torch.compiler.is_compiling():
        keep_recomputation_in_the_backward()
    region = outer.region_key()
    if isinstance(fn, nn.Module):
        # its tensors now (the step's, bound by state.apply) go in as arguments: the recompute
        # runs in the backward, after state.apply has put the module's own back
        module = fn
        args = ({**dict(module.named_parameters(remove_duplicate=False)),
                 **dict(module.named_buffers(remove_duplicate=False))}, *args)

        def fn(tensors, *args, **kwargs):
            return torch.func.functional_call(module, tensors, args, kwargs)

    def keyed_fn(*args, **kwargs):  # the same draws in the forward and in the recompute
        with random.keyed(region, autodiff=outer.autodiff, context=outer.context), _NoHostReads():
            return fn(*args, **kwargs)

    if policy == "everything_saveable":
        return keyed_fn(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    contexts = functools.partial(create_selective_checkpoint_contexts, _SAVED[policy])
    return checkpoint(keyed_fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
