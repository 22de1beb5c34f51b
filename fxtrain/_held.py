"""The step's tensors held in its module until the gradients are taken, for recomputation.

``state.apply`` runs the module on the step's parameters and buffers with
``torch.func.functional_call``, which puts the module's own (meta) tensors back when the call
returns. Activation checkpointing (``torch.utils.checkpoint``, transformers'
``gradient_checkpointing_enable()``, ``fx.remat``) reruns parts of the forward during the
backward, after that: the rerun would read the module's meta tensors. An eager step that takes
its gradients with ``torch.autograd.grad`` therefore runs its forward and backward inside
``holding()``, and ``call`` leaves the step's tensors in the module until the context ends.

A compiled step needs none of it: the recomputation is part of the graph, traced from the
forward, so ``call`` is ``functional_call`` there.

Tied tensors (a GPT-2's embedding and head) are bound here rather than by ``functional_call``'s
``tie_weights``, from the groups of tied names ``TrainState.create`` found when it made the
state's module (``state.layout.tied``, from ``tied_names``): Dynamo would otherwise trace torch's
walk over every submodule in every step it compiles (an eighth of the bytecode it traced for a
GPT-2 step). A module without them (None: one ``create`` could not copy) is left to
``functional_call``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ._torch.modules import reparametrized
from ._torch.traced_errors import fail

_held: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "fxtrain_held", default=None)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Inside (eager): the tensors ``call`` binds stay bound until the context ends."""
    with contextlib.ExitStack() as stack:
        token = _held.set(stack)
        try:
            yield
        finally:
            _held.reset(token)


def call(module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple,
         kwargs: dict[str, Any], groups: tuple[tuple[str, ...], ...] | None) -> Any:
    """``functional_call(module, tensors, args, kwargs)`` with the tied names ``groups``
    (``tied_names``'s; None: left to ``functional_call``); inside ``holding()`` the tensors stay
    in the module until that context ends (a later call's replace an earlier one's)."""
    if groups is not None:
        tensors = untied(groups, tensors)
    stack = None if torch.compiler.is_compiling() else _held.get()
    if stack is None:
        return functional_call(module, tensors, args, kwargs, tie_weights=groups is None)
    stack.enter_context(reparametrized(module, tensors, tie_weights=groups is None))
    return module(*args, **kwargs)


def tied_names(module: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The groups of names that share one tensor in ``module`` (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return tuple(tuple(names) for names in groups.values() if len(names) > 1)


def untied(groups: tuple[tuple[str, ...], ...],
           tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every name tied to a given one (``groups``: ``tied_names``'s) bound to
    the same tensor, as ``functional_call(..., tie_weights=True)`` binds them."""
    extra = {}
    for names in groups:
        given = [name for name in names if name in tensors]
        if not given:
            continue
        if any(tensors[name] is not tensors[given[0]] for name in given[1:]):
            fail(ValueError, f"state.apply got different tensors for {sorted(given)}, which the "
                             "module ties (one tensor): pass one of them")
        extra.update({name: tensors[given[0]] for name in names if name not in tensors})
    return {**tensors, **extra} if extra else tensors


def checkpointing(module: nn.Module) -> bool:
    """Whether any submodule has transformers' ``gradient_checkpointing`` on (a fact of the
    state's ``layout``, read by a ``torch.func`` step, which refuses it)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
