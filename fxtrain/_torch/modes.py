"""Torch-function modes, as fxtrain's keyed randomness and ``fx.remat`` see them: the modes in
force, and the ``torch.Tensor`` methods that reach a mode as plain functions.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0.

- ``innermost_mode(kind)``: ``torch.overrides._get_current_function_mode_stack`` (private; Dynamo
  traces it, and reads it itself to replay the modes in a compiled step). No public function
  lists the modes in force; a mode that recorded itself on entry would need its own stack,
  which Dynamo would trace as a Python side effect in every step.
- ``PYTHON_TENSOR_METHODS``: the methods of ``torch.Tensor`` written in Python, found by the
  private module they live in (``torch/_tensor.py``: ``split``, ``unflatten``...; 57 to 62 of
  them on those releases). A torch that moved them elsewhere would make the set empty: the
  keyed mode would then pass them on as functions, as it does any other.
- ``outside_dispatch_modes()``: ``torch.utils._python_dispatch._disable_current_modes``
  (private; also on torch 2.12.0). Host-side tensor work, such as reading a ``DeviceMesh``'s
  rank layout (``mesh.mesh`` computes it with tensor ops), run under a torch-dispatch mode in
  force: a ``FakeTensorMode`` (a simulated rank, ``benchmarks/simulate.py``) would make it fake
  tensors whose values it cannot read. No public function steps outside the modes; without it,
  such a read fails under a fake mode only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch.overrides import _get_current_function_mode_stack

Mode = TypeVar("Mode")


def innermost_mode(kind: type[Mode]) -> Mode | None:
    """The innermost torch-function mode in force that is a ``kind``, or None."""
    return next((m for m in reversed(_get_current_function_mode_stack())
                 if isinstance(m, kind)), None)


PYTHON_TENSOR_METHODS = frozenset(name for name, f in vars(torch.Tensor).items()
                                  if getattr(f, "__module__", None) == "torch._tensor")
"""The names of ``torch.Tensor``'s methods written in Python (see the module)."""


@contextlib.contextmanager
def outside_dispatch_modes() -> Iterator[None]:
    """A block run with no torch-dispatch mode in force (see the module)."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        yield
