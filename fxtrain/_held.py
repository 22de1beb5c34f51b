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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

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
         kwargs: dict[str, Any]) -> Any:
    """``functional_call(module, tensors, args, kwargs)``; inside ``holding()`` the tensors
    stay in the module until that context ends (a later call's replace an earlier one's)."""
    stack = None if torch.compiler.is_compiling() else _held.get()
    if stack is None:
        return functional_call(module, tensors, args, kwargs)
    stack.enter_context(_reparametrize_module(module, tensors, tie_weights=True))
    return module(*args, **kwargs)
