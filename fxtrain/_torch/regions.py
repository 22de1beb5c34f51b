"""Torch's regional compilation inside one graph, for ``fx.regional``: a function traced once and
compiled once, its graph called for every call of it in the step's graph.

Checked on torch 2.11.0, 2.13.0 and 2.15.0. ``torch.compiler.nested_compile_region`` (public,
marked experimental; since torch 2.8): Dynamo traces the function's first call into a subgraph
(the ``invoke_subgraph`` operator) and reuses it for later calls whose inputs have the same
structure, shapes and dtypes; AOTAutograd and Inductor compile the subgraph, forward and
backward, once. Eagerly it calls the function.

Torch's own limits, met on every release above: the region's tensors must be its arguments (a
parameter it reads off a module whose tensors the step bound is a free variable Dynamo cannot
lift: "Freevar has no source"), and a region cannot be traced under ``torch.func``'s transforms
("Expected FakeTensor"), so a regional step takes autograd's path. Its draws of keyed randomness
are counted while Dynamo traces it (``note_draws``, run for real then): the subgraph, reused
for later layers, is not traced again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .traced_errors import run_while_tracing

_DRAWS: dict[str, int] = {}


def nested(fn: Callable) -> Callable:
    """``fn`` as a region traced and compiled once (see the module)."""
    return torch.compiler.nested_compile_region(fn)


@run_while_tracing
def note_draws(name: str, draws: int) -> bool:
    """Records, while Dynamo traces the region of the block class ``name``, how many keyed
    draws it made (run for real, its result a constant)."""
    _DRAWS[name] = draws
    return True


@run_while_tracing
def draws(name: str) -> int:
    """The keyed draws of the region of the block class ``name`` (``note_draws``'), as a
    constant of the trace."""
    return _DRAWS[name]


def region_inputs(module: torch.nn.Module) -> dict[str, Any]:
    """The tensors bound to ``module`` now (the step's, by ``state.apply``), by name: a
    region's explicit arguments."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}
