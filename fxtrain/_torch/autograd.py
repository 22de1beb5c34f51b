"""Gradients from ``torch.autograd`` inside a train step: the leaves they are taken for, the
engine called without torch-function dispatch, and the Dynamo settings that trace them.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0.

- ``leaves(params)``: a tensor per parameter that requires grad, for ``torch.autograd.grad``.
  Eagerly, and compiled on torch 2.13 and later, ``p.detach().requires_grad_()`` (Dynamo traces
  ``requires_grad_`` on a tensor made inside the graph). Torch 2.11's Dynamo refuses every way of
  making a leaf inside the graph (``requires_grad_``, ``requires_grad=True`` factories,
  ``nn.Parameter``, setting the attribute); there each leaf is ``p.detach() + anchor``, where
  ``anchor`` is a 0-d zero that requires grad, made once per device outside the graph (Dynamo
  lifts it as an input): a tensor that requires grad, which ``autograd.grad`` differentiates
  with respect to as it would a leaf, for one element-wise add per parameter.
- ``engine_grads``: ``torch.autograd.graph._engine_run_backward`` (private; what
  ``torch.autograd.grad`` calls, in every torch since 2.4), so that a torch-function mode does
  not take the call (no public route skips the modes).
- ``saved_tensors_hooks_active()``: ``torch._C._autograd._top_saved_tensors_default_hooks``
  (private; what AOTAutograd asks), whether saved-tensor hooks are in force (an activation
  checkpointed region's, ``torch.autograd.graph.saved_tensors_hooks``). An eager sharded unit
  keeps its gathered parameters out of the backward with hooks of its own, which would hide
  the tensors an outer region's hooks must see; inside one it gathers without them
  (``fxtrain.distributed._unit_gather``). No public route. Run on 2.13.0; the same signature
  is in 2.11.0's and 2.15.0's stubs. Where the function is missing it answers None (this torch
  cannot say), and the unit takes ``_units``' checkpointed region, which nests: correct, at the
  memory of every output of the unit's forward kept for the backward.
- Dynamo's settings that trace ``torch.autograd.grad`` and a checkpoint's side effects:
  ``fxtrain._torch.traced_settings``, on while a step is traced only.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import _engine_run_backward

from .traced_errors import run_while_tracing
from .version import at_least

_ANCHORS: dict[str, torch.Tensor] = {}


@run_while_tracing
def _make_anchor(device: str) -> bool:  # run for real while Dynamo traces
    if device not in _ANCHORS:
        _ANCHORS[device] = torch.zeros((), device=device, requires_grad=True)
    return True


def leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor per parameter, of its value, that requires grad (see the module)."""
    if at_least(2, 13) or not torch.compiler.is_compiling():
        return {k: p.detach().requires_grad_() for k, p in params.items()}
    out = {}
    for k, p in params.items():
        _make_anchor(str(p.device))
        out[k] = p.detach() + _ANCHORS[str(p.device)]
    return out


def engine_grads(value: torch.Tensor, inputs: list[torch.Tensor]) -> tuple:
    """``torch.autograd.grad(value, inputs, allow_unused=True)`` without torch-function
    dispatch (see the module)."""
    return _engine_run_backward((value,), (torch.ones_like(value),), False, False,
                                tuple(inputs), True, False)


def saved_tensors_hooks_active() -> bool | None:
    """Whether saved-tensor hooks are in force here; None where this torch cannot say (see the
    module)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(True) is not None
