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
are counted while Dynamo traces it (``draw_table``'s ``note``, run for real then): the
subgraph, reused for later layers, is not traced again.

Dynamo traces each call of a region again unless it may reuse the first call's subgraph. Its
own check (guards on what the trace read, since torch 2.12) refuses a region with side effects,
and a block's region has one: ``functional_call`` swaps the block's tensors in and back. So
``nested(fn, key=...)`` passes torch's ``reuse_hash_fn`` (torch 2.12 and later; 2.11 traces every
call): ``key`` (traced by Dynamo, with the region's arguments) gives a constant that names what
the trace depends on, and calls of one key reuse the first call's subgraph without tracing it.
``key_of`` turns a signature (a tuple of constants) into that constant.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .traced_errors import run_while_tracing

REUSES = "reuse_hash_fn" in inspect.signature(torch.compiler.nested_compile_region).parameters
_MAX_KEYS = 64  # distinct signatures of one region in one step (torch's default: 8)


def nested(fn: Callable, key: Callable[..., int] | None = None) -> Callable:
    """``fn`` as a region traced and compiled once (see the module); with ``key``, its calls
    of one key reuse the first one's trace (where torch can)."""
    if key is None or not REUSES:
        return torch.compiler.nested_compile_region(fn)
    return torch.compiler.nested_compile_region(fn, reuse_hash_fn=key,
                                                max_reuse_entries=_MAX_KEYS)


@run_while_tracing
def key_of(signature: tuple) -> int:
    """A region's reuse key: the hash of ``signature`` (constants), a number kept by nothing
    (two signatures of one hash, 1 in 2**64 of a pair, would share a trace)."""
    return hash(signature)


def flat_key(head: tuple, flat: tuple) -> int:
    """The reuse key of a region called with flat tensors (traced by Dynamo): ``head``
    (constants naming what the trace depends on besides them) and each tensor's shape, strides,
    dtype, device and whether it requires grad, in one plain loop."""
    found = list(head)
    for x in flat:
        found.append((tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad))
    return key_of(tuple(found))


def signature(x: Any) -> Any:
    """What a trace reads of a region's argument ``x`` (traced by Dynamo): a tensor's shape,
    strides, dtype, device and whether it requires grad; a dict's keys and a sequence's kind
    with their items'; another pytree node's leaves; any other value as it is (a constant).
    Plain loops: Dynamo traces a generator or a call per item far slower."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    if isinstance(x, dict):
        keys, x = list(x), list(x.values())
    elif isinstance(x, (tuple, list)):
        keys = [type(x).__name__]
    else:
        leaves = torch.utils._pytree.tree_leaves(x)  # a pytree node of another kind
        if len(leaves) == 1 and leaves[0] is x:
            return x
        keys, x = [type(x).__name__], leaves
    for v in x:
        keys.append((tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
                    if isinstance(v, torch.Tensor) else signature(v))
    return tuple(keys)


class DrawTable(NamedTuple):
    """``draw_table``'s two functions: ``note(name, draws)`` and ``count(name)``."""

    note: Callable[[str, int], bool]
    count: Callable[[str], int]


def draw_table() -> DrawTable:
    """A regional skeleton's keyed draws per kind of block (one table each, made by
    ``fx.regional``, gone with the skeleton): ``note(name, draws)``, run for real while Dynamo
    traces the region of the blocks of kind ``name`` (its result a constant), and
    ``count(name)``, that number as a constant of the trace. Two closures over the table, so
    that Dynamo passes them constants only: torch 2.11's cannot pass a module to a function it
    runs while tracing ("UnspecializedNNModuleVariable is not a constant")."""
    table: dict[str, int] = {}

    @run_while_tracing
    def note(name: str, draws: int) -> bool:
        table[name] = draws
        return True

    @run_while_tracing
    def count(name: str) -> int:
        return table[name]

    return DrawTable(note, count)


def tensor_paths(module: torch.nn.Module) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """Where ``module``'s parameters and buffers sit: ``(submodule path, attribute, qualified
    name)`` for each, ``region_inputs``' walk done once, eagerly (``fx.regional``)."""
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    return tuple((tuple(n.split(".")[:-1]), n.rsplit(".", 1)[-1], n) for n, _ in named)


def region_inputs(module: torch.nn.Module, paths: tuple) -> dict[str, Any]:
    """The tensors bound to ``module`` now (the step's, by ``state.apply``), by name: a
    region's explicit arguments, read where ``paths`` (``tensor_paths(module)``) says they sit
    rather than found by a walk of every submodule (which Dynamo traces in Python: some 120
    calls of ``named_modules`` per GPT-2 block)."""
    found = {}
    for path, attribute, name in paths:
        owner = module
        for part in path:
            owner = getattr(owner, part)
        found[name] = getattr(owner, attribute)
    return found
