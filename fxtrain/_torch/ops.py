"""ATen operators fxtrain names that are private to ATen (a leading underscore): looked up by
name, so that one a torch release lacks is left out rather than failing the import.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0 (each has every op named here). No public
route names them: they are what ``F.scaled_dot_product_attention`` dispatches to, per backend.
"""

from __future__ import annotations

import functools

import torch

ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention")
"""The ATen ops of ``F.scaled_dot_product_attention``'s kernels, by name."""


def _default(name: str) -> torch._ops.OpOverload | None:
    """``torch.ops.aten.<name>.default``, or None where this torch has no such op."""
    packet = getattr(torch.ops.aten, name, None)  # torch.ops raises AttributeError for none
    return None if packet is None else packet.default


@functools.cache
def attention() -> frozenset:
    """The ``.default`` overloads of the ``ATTENTION`` ops this torch has."""
    return frozenset(op for op in map(_default, ATTENTION) if op is not None)
