"""A train step's eager run, watched op by op: each ATen op's floating outputs checked, with the
module it ran in and its side (forward, backward, update), for ``find_nonfinite``.

The module path comes from global forward hooks (the module running, named from the state's
model), the side from autograd: an op run while autograd's engine runs a node is in the
backward, and that node was made in the forward by a torch function call, which a
torch-function mode saw, in a module. Both gradient paths run autograd's engine
(``torch.func.grad_and_value`` too), so both show their modules.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .._torch import op_watch
from ._taint import Taint

_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep,
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)  # fxtrain/


def user_line() -> str:
    """The innermost frame running now outside torch and fxtrain, as ``file:line in f``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame = frame.f_back
    return "" if frame is None else (
        f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")


class _Nodes(TorchFunctionMode):
    """Names each autograd node a torch function call makes with the module running it."""

    def __init__(self, watch: EagerWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.watch.name_nodes(out)
        return out


class EagerWatch:
    """Watches every op of the eager run inside it (a context manager); ``taint`` holds what
    went non-finite. ``model`` names the modules (its own ``named_modules`` paths)."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): name for name, m in model.named_modules()}
        self.running: list[tuple[str | None, str]] = []  # the modules in their forward
        self.nodes: dict[Any, tuple[str | None, str, str]] = {}  # node -> module, type, where
        self.taint = Taint()
        self.after_backward = False
        self.handles: list = []
        self.modes = [_Nodes(self), op_watch.OpWatch(self.on_op)]

    def module(self) -> tuple[str | None, str]:
        """The innermost module in its forward now: (path, class name); (None, "") outside."""
        return self.running[-1] if self.running else (None, "")

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self.running.append((self.names.get(id(module), type(module).__name__),
                             type(module).__name__))

    def _leave(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.name_nodes(out)  # made inside it by what no torch function call returned
        if self.running:
            self.running.pop()

    def name_nodes(self, out: Any) -> None:
        """Names the autograd nodes behind ``out`` not named yet with the module running now."""
        frontier = [t.grad_fn for t in pytree.tree_leaves(out)
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        where = None
        while frontier:
            node = frontier.pop()
            if node is None or node in self.nodes:
                continue
            where = user_line() if where is None else where
            self.nodes[node] = (*self.module(), where)
            frontier += [n for n, _ in node.next_functions]

    def __enter__(self) -> EagerWatch:
        self.handles = [register_module_forward_pre_hook(self._enter),
                        register_module_forward_hook(self._leave, always_call=True)]
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def on_op(self, op: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if not self.after_backward and op_watch.backward_node() is not None:
            self.after_backward = True
        written = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        written += [t for t in op_watch.written_in_place(op, args, kwargs)
                    if not any(t is w for w in written)]
        read = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.taint.record(read, written, facts=lambda: self._facts(op))

    def _facts(self, op: Any) -> dict[str, Any]:
        node = op_watch.backward_node()
        if node is not None:
            module, module_type, where = self.nodes.get(node, (None, "", ""))
            return dict(op=str(op), module=module, module_type=module_type, side="backward",
                        where=where, detail=f"in the backward of {node.name()}")
        module, module_type = self.module()
        side = "update" if module is None and self.after_backward else "forward"
        return dict(op=str(op), module=module, module_type=module_type, side=side,
                    where=user_line(), detail="")
