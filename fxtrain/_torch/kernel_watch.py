"""The Inductor kernels of a fresh compile of a train step, each call seen with the tensors it
read and wrote, for ``fx.debug.find_nonfinite``; and the FX nodes each kernel computes.

Checked on torch 2.13.0 (the release this machine runs; CI runs the unit tests on 2.11 and 2.15).
Each name is looked up when it is used; where a torch lacks one, the check it serves degrades as
said rather than failing.

- ``KernelWatch``: a fresh Inductor compile through ``torch._inductor.compile_fx.compile_fx``
  with our own ``inner_compile`` (private), to reach the module Inductor generated for the
  graph (``OutputCode.current_callable``'s globals) and replace each kernel there (C++
  ``cpp_pybinding`` functions, Triton kernels' ``run``, ``extern_kernels``) by one that reports
  its call, for that one run; the originals are put back after it. Which arguments a kernel
  reads and writes comes from its parameter names in Inductor's source (``in_ptr``,
  ``out_ptr``, ``in_out_ptr``; an extern kernel writes its ``out=``). The compile's own
  Inductor settings go through ``compile_fx``'s ``config_patches`` (per compile): no FX graph
  cache (a cache hit skips the code generation that records which FX nodes each kernel
  computes), ``cpp_wrapper`` off (its kernels are called from C++, out of reach), and
  ``trace.provenance_tracking_level=1``, whose record of kernel -> FX nodes is read from
  ``torch._inductor.debug`` inside ``reset_provenance_globals`` (which puts those globals
  back). AOTAutograd's cache (``torch._functorch.config.enable_autograd_cache``, which no
  per-compile route reaches) is off for the duration of the call only. Without provenance a
  kernel is named without its module; without the generated module's globals nothing is
  watched and only the step's results are checked. Public fallback: none (no public hook sees
  a compiled graph's kernels).
- ``Origins(gm)``: FX node metadata of Inductor's post-grad graph (``nn_module_stack``,
  ``stack_trace``, ``autograd_backward``, ``from_node``), Dynamo's and AOTAutograd's records.
- ``settings_kept()``: Dynamo's and Inductor's configs (``torch._dynamo.config``,
  ``torch._inductor.config``; their keys from ``get_config_copy``), put back as they were after
  the compiled check: tracing a train step sets some of them for the process (fxtrain's
  recompute pass, ``fxtrain._torch.recompute``), and a check must leave none behind.

Inductor's own ``nan_asserts`` is not used: on the CPU (torch 2.13) it asserts only the compiled
graph's inputs and outputs (``assert not var.isnan().any().item()``, a bare AssertionError from
the generated wrapper), per kernel only for Triton on a GPU, where it stops at the first kernel
that leaves any non-finite value in a buffer (a materialized ``-inf`` mask too), and its input
asserts refuse a state that holds an infinity on purpose (an early-stopping best).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep,
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)  # fxtrain/


def fresh_function(fn: Callable) -> Callable:
    """``fn`` called through a function with a code object of its own: Dynamo keeps what it
    compiles on the code object, so a compile of this one leaves ``fn``'s untouched and goes
    when it does."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    return types.FunctionType(call.__code__.replace(), call.__globals__, "find_nonfinite_step",
                              call.__defaults__, call.__closure__)


# -- the compiled graph's FX nodes: module, side, source line ----------------------------------

@dataclasses.dataclass(frozen=True)
class Origin:
    """An FX node a kernel computes: its ATen op, the module path it ran in (``None`` outside
    the model), that module's class name, its side and the user's source line."""

    op: str
    module: str | None
    module_type: str
    side: str
    where: str


_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")


def _dotted(path: str) -> str:
    """Dynamo's ``getattr(L['state'].module.blocks, '1').qkv`` as
    ``L['state'].module.blocks.1.qkv``."""
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            return path
        path = new


def _module_of(meta: dict) -> tuple[str, str] | None:
    """(path below the outermost module, class name) of a node's ``nn_module_stack``."""
    stack = list((meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None
    root, (inner, cls) = _dotted(str(stack[0][0])), stack[-1]
    inner = _dotted(str(inner))
    path = "" if inner == root else inner[len(root) + 1:] if inner.startswith(root + ".") else inner
    return path, getattr(cls, "__name__", str(cls))


def _is_backward(node: Any) -> bool:
    if node.meta.get("autograd_backward"):
        return True
    names = {getattr(s, "name", None) for s in node.meta.get("from_node") or ()}
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    return "_autograd_grad" in names or any(
        "autograd.grad(" in line or "_autograd_grad(" in line for line in trace[-2:])


def user_line(stack_trace: str) -> str:
    """The innermost frame of an FX stack trace outside torch and fxtrain, as ``file:line in f``
    ("" when it has none: Dynamo's trace of an op under a torch-function mode may stop at it)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stack_trace or "")
    user = [f for f in frames if not f[0].startswith(_LIBRARIES)]
    if not user:
        return ""
    path, line, name = user[-1]
    return f"{path}:{line} in {name}"


class Origins:
    """The call nodes of Inductor's graph, each described on demand as an ``Origin``: its op,
    module, side and source line. A backward node's module is the one of the nearest forward
    values it reads (the graph keeps no module for it); a node after the backward that is in no
    module is the update."""

    def __init__(self, gm: torch.fx.GraphModule):
        nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(nodes)}
        self.nodes = {n.name: n for n in nodes if n.op == "call_function"}
        self.backward = {n for n in self.nodes.values() if _is_backward(n)}
        self.after: set = set()
        for n in nodes:  # in topological order
            if n not in self.backward and any(a in self.backward or a in self.after
                                              for a in n.all_input_nodes):
                self.after.add(n)
        self.known: dict[str, Origin] = {}

    def __call__(self, name: str) -> Origin | None:
        node = self.nodes.get(name)
        if node is None:
            return None
        if name not in self.known:
            module = _module_of(node.meta) or (
                self._nearest_module(node) if node in self.backward else None)
            side = ("backward" if node in self.backward else
                    "forward" if module is not None or node not in self.after else "update")
            self.known[name] = Origin(str(node.target), None if module is None else module[0],
                                      "" if module is None else module[1], side,
                                      user_line(node.meta.get("stack_trace", "")))
        return self.known[name]

    def _nearest_module(self, node: Any) -> tuple[str, str] | None:
        """The module of the nearest forward values ``node`` reads; of several as near, the
        first in the forward (the gradient a backward op reads comes from later modules)."""
        seen, frontier = {node}, list(node.all_input_nodes)
        while frontier:
            found = sorted((self.order[n], m) for n in frontier
                           if (m := _module_of(n.meta)) is not None)
            if found:
                return found[0][1]
            frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
            seen.update(frontier)
        return None


# -- the kernels of the generated module -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    """An Inductor kernel call: its name, and the names of the FX nodes it computes in
    ``graph`` (none: not known on this torch)."""

    name: str
    nodes: tuple[str, ...] = ()
    graph: Origins | None = None

    def origins(self) -> tuple[Origin, ...]:
        """The FX nodes it computes, described."""
        found = (self.graph(n) for n in self.nodes) if self.graph is not None else ()
        return tuple(o for o in found if o is not None)


OnKernel = Callable[[Kernel, list, list], None]
"""``on_kernel(kernel, read, written)``: called after each kernel call with the tensors it read
and those it wrote (a tensor it updates in place is among both)."""

_KERNEL = re.compile(r"^(\w+) = async_compile\.(cpp_pybinding|triton)\(", re.M)
_PARAMS = re.compile(r"""(?:kernel|def \w+)\(([^)]*)\)""")


def _roles(source: str) -> dict[str, list[str]]:
    """Each kernel's arguments in order: "in" (read), "out" (written), "inout" (both) or ""
    (not a tensor), by their names in the kernel's source in Inductor's (its C++ ``kernel``'s
    or its Triton function's parameters: ``in_ptr0``, ``out_ptr0``, ``in_out_ptr0``)."""
    found = list(_KERNEL.finditer(source))
    roles = {}
    for match, after in zip(found, [*found[1:], None]):
        text = source[match.end():after.start() if after else len(source)]
        params = _PARAMS.search(text)
        if params is None:
            continue
        names = [re.split(r"[\s*&:]+", p.strip().split(":")[0])[-1]
                 for p in params.group(1).split(",") if p.strip()]
        roles[match.group(1)] = ["inout" if "in_out_ptr" in n else "out" if "out_ptr" in n
                                 else "in" if "in_ptr" in n else "" for n in names]
    return roles


class _Calls:
    """The n-th call of a kernel name -> the FX nodes of its n-th place in the generated code
    (Inductor's provenance numbers each place in code order)."""

    def __init__(self, provenance: dict[str, list[str]], graph: Origins):
        places: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        for key, names in provenance.items():
            name, _, handle = key.rpartition(":")
            places.setdefault(name, []).append((int(handle) if handle.isdigit() else 0,
                                                tuple(names)))
        self.places = {k: [n for _, n in sorted(v, key=lambda p: p[0])] for k, v in places.items()}
        self.graph = graph
        self.count: dict[str, int] = {}

    def next(self, name: str) -> Kernel:
        n = self.count.get(name, 0)
        self.count[name] = n + 1
        places = self.places.get(name) or [()]
        return Kernel(name, places[min(n, len(places) - 1)], self.graph)


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]


def _watched(kernel: Callable, name: str, roles: list[str] | None, calls: _Calls,
             on_kernel: OnKernel) -> Callable:
    def call(*args, **kwargs):
        out = kernel(*args, **kwargs)
        if roles is None:  # an extern kernel: it writes its ``out=`` (or returns its result)
            written = _tensors([kwargs.get("out", out)])
            read = _tensors([*args, *(v for k, v in kwargs.items() if k != "out")])
        else:
            read = _tensors(a for a, r in zip(args, roles) if r in ("in", "inout"))
            written = _tensors(a for a, r in zip(args, roles) if r in ("out", "inout"))
        on_kernel(calls.next(name), read, written)
        return out

    return call


class _Proxy:
    """An object whose ``attrs`` are replaced, everything else its ``target``'s."""

    def __init__(self, target: Any, attrs: Callable[[str, Any], Any]):
        self._target, self._attrs = target, attrs

    def __getattr__(self, attr: str) -> Any:
        return self._attrs(attr, getattr(self._target, attr))


def _install(namespace: dict, source: str, calls: _Calls, on_kernel: OnKernel) -> Callable:
    """Replaces the kernels in a generated module's ``namespace``; returns the undo."""
    saved = {}
    for name, roles in _roles(source).items():
        kernel = namespace.get(name)
        if kernel is None:
            continue
        saved[name] = kernel
        if callable(kernel) and not hasattr(kernel, "run"):
            namespace[name] = _watched(kernel, name, roles, calls, on_kernel)
        else:  # a Triton kernel: the wrapper calls ``kernel.run(...)``
            run = _watched(kernel.run, name, roles, calls, on_kernel)
            namespace[name] = _Proxy(kernel, lambda a, v, run=run: run if a == "run" else v)
    extern = namespace.get("extern_kernels")
    if extern is not None:
        saved["extern_kernels"] = extern
        namespace["extern_kernels"] = _Proxy(extern, lambda a, v: _watched(
            v, f"extern_kernels.{a}", None, calls, on_kernel) if callable(v) else v)

    def undo() -> None:
        namespace.update(saved)

    return undo


def _namespace(compiled: Any) -> dict | None:
    """The globals of the module Inductor generated (where its ``call`` finds its kernels)."""
    call = getattr(compiled, "current_callable", None)
    function = getattr(call, "__func__", call)
    return getattr(function, "__globals__", None)


def settings(config: Any) -> dict[str, Any]:
    """A torch config module's settings: each key (``get_config_copy``'s, aliases left out) with
    its value itself (``get_config_copy`` deep-copies them: a pass object's copy is another)."""
    with warnings.catch_warnings():  # deprecated keys warn when read
        warnings.simplefilter("ignore")
        return {key: getattr(config, key) for key in config.get_config_copy()}


@contextlib.contextmanager
def settings_kept() -> Iterator[None]:
    """A block after which Dynamo's and Inductor's settings are as before it (see the module)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = [(config, settings(config)) for config in (dynamo_config, inductor_config)]
    try:
        yield
    finally:
        for config, before in saved:
            now = settings(config)
            for key, value in before.items():
                if now[key] is not value and _differ(now[key], value):
                    setattr(config, key, value)


def _differ(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # values without a plain comparison
        return True


class KernelWatch:
    """Compiles functions with Inductor so that each kernel call reports to ``on_kernel`` (see
    the module). Use as a context manager: the kernels are watched inside it, and put back, with
    the settings it changed, when it ends. ``watched`` tells whether any kernel was reached."""

    def __init__(self, on_kernel: OnKernel):
        self.on_kernel = on_kernel
        self.undo: list[Callable[[], None]] = []
        self.watched = False
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> KernelWatch:
        import torch._functorch.config as functorch_config
        import torch._inductor.debug as inductor_debug

        if hasattr(functorch_config, "enable_autograd_cache"):
            self.stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        if hasattr(inductor_debug, "reset_provenance_globals"):
            self.stack.enter_context(inductor_debug.reset_provenance_globals())
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()
        self.stack.close()

    def compile(self, fn: Callable) -> Callable:
        """``fn`` compiled (``fullgraph=True``) on its first call, with its kernels watched."""
        return torch.compile(fresh_function(fn), fullgraph=True, backend=self._backend)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        patches = {"fx_graph_cache": False, "cpp_wrapper": False}
        if hasattr(inductor_config.trace, "provenance_tracking_level"):
            patches["trace.provenance_tracking_level"] = 1
        return compile_fx(gm, example_inputs, inner_compile=self._inner, config_patches=patches)

    def _inner(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Any:
        import torch._inductor.debug as inductor_debug
        from torch._inductor.compile_fx import compile_fx_inner

        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        namespace = _namespace(compiled)
        source = getattr(compiled, "source_code", None)
        if namespace is not None and isinstance(source, str):
            provenance = getattr(inductor_debug, "_inductor_triton_kernel_to_post_grad_node_info",
                                 None) or {}
            calls = _Calls(dict(provenance), Origins(gm))
            self.undo.append(_install(namespace, source, calls, self._seen))
        return compiled

    def _seen(self, kernel: Kernel, read: list, written: list) -> None:
        self.watched = True
        self.on_kernel(kernel, read, written)

