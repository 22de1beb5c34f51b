"""``nn.Module`` internals: binding other tensors into a module for a while, and the base class
of torch's batch norms.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0.

- ``reparametrized``: ``torch.nn.utils.stateless._reparametrize_module`` (private), the context
  that ``torch.func.functional_call`` runs its call in. The public ``functional_call`` binds the
  tensors for one call only; an eager autograd step keeps them bound until its backward has
  rerun the checkpointed regions (``fxtrain._held``), and a sharded unit binds its gathered
  parameters around its own ``forward`` (``fxtrain.distributed._units``). Dynamo knows the function by name
  (``trace_rules``: it traces the binding as a context), so it is called as it is, not copied.
- ``BatchNorm``: ``torch.nn.modules.batchnorm._BatchNorm`` (private), the base of
  ``BatchNorm1d/2d/3d``, their lazy forms and ``SyncBatchNorm``; torch's own
  ``torch.optim.swa_utils.update_bn`` finds batch norms by it. The public route, a tuple of
  those classes, would miss a user's subclass of the base.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["reparametrized", "BatchNorm"]


def reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor], *,
                   tie_weights: bool = False) -> contextlib.AbstractContextManager:
    """A context inside which ``module``'s parameters and buffers named in ``tensors`` are
    those tensors (``tie_weights``: names tied in ``module`` follow a given one, as in
    ``functional_call``); the module's own are back when it ends."""
    return _reparametrize_module(module, tensors, tie_weights=tie_weights)
