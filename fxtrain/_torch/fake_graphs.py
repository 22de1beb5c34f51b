"""What a function computes, as a graph of aten operators, without computing it: for
``fx.regional``'s check that two blocks of one class compute the same thing.

Checked on torch 2.11.0, 2.13.0 and 2.15.0. ``make_fx`` (``torch.fx.experimental.proxy_tensor``,
documented, not in ``torch``'s public API list) traces a function on fake tensors
(``torch._subclasses.FakeTensorMode``, private) into an FX graph of aten operators: every Python
value the function reads (an int attribute, a branch, an index) is a constant of that graph, so
two calls that give graphs of one code computed the same thing on inputs of that description.
The function runs as Python once on fake tensors: no memory for the tensors, no kernels.

Run while Dynamo traces a step (``run_while_tracing``), the trace happens outside the step's
torch-function modes (``fxtrain.random.keyed``: a stand-in's draws must not count as the step's)
and its torch-dispatch modes (Dynamo's own fake mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree

from .modes import outside_dispatch_modes


def describe(x: Any) -> Any:
    """A description of ``x`` from which ``graph_code`` makes stand-ins (plain loops: Dynamo
    traces it): a tensor's shape, strides, dtype, device and whether it requires grad; lists,
    tuples and dicts item by item; a plain value as it is; anything else ``None`` (the whole
    description is then ``None``: nothing to stand in for it)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    if isinstance(x, (type(None), bool, int, float, str)):
        return ("value", x)
    if isinstance(x, (tuple, list, dict)):
        keys = list(x) if isinstance(x, dict) else list(range(len(x)))
        items = []
        for k in keys:
            item = describe(x[k])
            if item is None:
                return None
            items.append((k, item))
        return (type(x).__name__, tuple(items))
    return None


def _stand_in(description: Any) -> Any:
    kind, rest = description[0], description[1:]
    if kind == "tensor":
        shape, stride, dtype, device, requires_grad = rest
        return torch.empty_strided(shape, stride, dtype=dtype, device=device,
                                   requires_grad=requires_grad)
    if kind == "value":
        return rest[0]
    items = [(k, _stand_in(v)) for k, v in rest[0]]
    return dict(items) if kind == "dict" else {"tuple": tuple, "list": list}[kind](
        v for _, v in items)


def graph_code(fn: Callable, description: Any) -> str:
    """The code of the aten graph ``fn(*stand_ins)`` computes, where ``description`` (a tuple of
    ``describe``'s) says what its arguments are: the graph's Python source, then the structure
    and the values of its result's leaves that are not tensors. Raises whatever tracing ``fn``
    raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    rest: list[Any] = []

    def tensors_out(*args: Any) -> list[torch.Tensor]:
        leaves, spec = _pytree.tree_flatten(fn(*args))
        rest.append((str(spec), [v if not isinstance(v, torch.Tensor) else None
                                 for v in leaves]))
        return [v for v in leaves if isinstance(v, torch.Tensor)]

    with _no_function_modes(), outside_dispatch_modes(), torch._guards.tracing(None):
        with FakeTensorMode(allow_non_fake_inputs=False):
            args = [_stand_in(d) for d in description]
        gm = make_fx(tensors_out, tracing_mode="fake")(*args)
    return f"{gm.code}\n{rest[-1]!r}"


@contextlib.contextmanager
def _no_function_modes() -> Iterator[None]:
    """No torch-function mode in force (``torch.overrides``' private mode stack) in the block."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode
    modes = _get_current_function_mode_stack()
    for _ in modes:
        _pop_mode()
    try:
        yield
    finally:
        for mode in modes:
            _push_mode(mode)
