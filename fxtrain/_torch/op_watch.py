"""The eager ops of a train step as they run, for ``fx.debug.find_nonfinite``: what
``torch.compile`` wrapped, the autograd node whose backward runs, what an op writes in place, and
a dispatch mode that sees every ATen op.

Checked on torch 2.13.0 (the release this machine runs; CI runs the unit tests on 2.11 and 2.15).
Each name is looked up when it is used; where a torch lacks one, the check it serves degrades as
said rather than failing.

- ``uncompiled(fn)``: ``torch.compile`` keeps what it wraps in ``_torchdynamo_orig_callable``
  (private; ``fxtrain._torch.dynamo.is_compiled`` reads the same mark). No public route.
- ``backward_node()``: ``torch._C._current_autograd_node`` (private), the autograd node whose
  backward is running (None in the forward), on both of fxtrain's gradient paths
  (``torch.func.grad_and_value`` runs autograd's engine too). Public fallback: none; without it
  every op counts as forward.
- ``written_in_place(op, args, kwargs)``: the arguments an ATen op writes, from its schema
  (``OpOverload._schema``, private; ``alias_info.is_write``), as ``add_``, ``copy_`` and the
  optimizers' ``_foreach_*_`` ops do. Public fallback: none; without it an op's outputs alone
  are checked (an in-place op returns what it wrote, but a ``_foreach_*_`` op returns nothing).
- ``OpWatch``: a ``torch.utils._python_dispatch.TorchDispatchMode`` (private module; the class
  that ``torch.utils.module_tracker``'s users and ``FlopCounterMode`` build on). No public
  dispatch-level mode exists; a ``TorchFunctionMode`` sees Python calls, not the ATen ops of a
  backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def uncompiled(fn: Callable) -> Callable:
    """The function ``torch.compile`` wrapped in ``fn`` (``fn`` itself when it is not one)."""
    while getattr(fn, "_torchdynamo_orig_callable", None) is not None:
        fn = fn._torchdynamo_orig_callable
    return fn


def backward_node() -> Any:
    """The autograd node whose backward is running now, or None (in the forward)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return None if current is None else current()


def written_in_place(op: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an ATen op's arguments that it writes (``add_``'s self, an ``out=``)."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = kwargs.get(arg.name, args[i] if i < len(args) and not arg.kwarg_only else None)
        out += [value] if isinstance(value, torch.Tensor) else [
            v for v in value or () if isinstance(v, torch.Tensor)] if isinstance(
                value, (list, tuple)) else []
    return out


class OpWatch(TorchDispatchMode):
    """A dispatch mode that calls ``on_op(op, args, kwargs, out)`` after each ATen op."""

    def __init__(self, on_op: Callable[[Any, tuple, dict, Any], None]):
        super().__init__()
        self.on_op = on_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.on_op(func, args, kwargs, out)
        return out
