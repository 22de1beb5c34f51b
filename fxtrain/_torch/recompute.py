"""Cheap forward work recomputed in the backward of a compiled train step, as torch's partitioner
does for a compiled module.

A train step is one graph: the forward, the backward its gradients come from (traced by
``torch.func`` or by ``torch.autograd.grad``) and the update. AOT autograd sees it as a graph
with no backward of its own, so its min-cut partitioner never runs, and every forward tensor
the backward reads lives from the forward to that read: the outputs of each GELU, of each
residual add, of each dropout, beside the matrix products they came from. A compiled module
keeps the matrix products and recomputes the cheap element-wise work from them in its backward.

``recompute`` does that on the step's graph, in Inductor's post-grad passes (``install`` sets it
as ``torch._inductor.config.post_grad_custom_pre_pass`` while a step is traced). The step marks
its forward with ``torch.fx.traceback.annotate`` (``FORWARD``); every other node reading a cheap
forward node (an element-wise op, or a view) reads a copy of it made just before, and the
forward's own, now unread, is dropped. A copy's inputs are copied in turn while they are
cheap, so a chain of element-wise ops is recomputed from the last tensor the forward keeps
anyway (a matrix product, a reduction, a boolean mask); a constant (the zeros of a dropout's
``where``) is made again. Not cheap, so kept: random ops,
mutations, booleans (a mask is a quarter of the floats it selects), casts to a narrower dtype
(the copy would keep the wider input alive), and a node whose recomputation would repeat more
than ``CHAIN`` ops (a residual stream is a chain through every layer: it is kept every few
layers and recomputed in between). Other graphs (no forward annotation) pass unchanged.

On ``benchmarks/scale.py``'s GPT-2 (8 layers, width 512, 2 x 512 tokens) the step's peak fell
from 1.15x a compiled module's loop to 0.88x per parameter, at the same tokens/s
(``docs/memory.md``).

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. Torch's internals it reads: FX node metadata
(``custom``, ``autograd_backward``, ``val``), ``torch._ops.OpOverload``'s schema and tags,
``torch._inductor.custom_graph_pass`` and ``torch._inductor.config.post_grad_custom_pre_pass``.
The public route to a pass, ``torch.compile(options={"post_grad_custom_pre_pass": ...})``, is
the user's when they compile; ``install`` sets it while Dynamo traces a step, whoever compiled
it. Without ``annotate`` (torch before 2.9) ``marked`` leaves the step as it is: it then keeps
its activations, as before this pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback  # noqa: F401 - annotate, read as an attribute (torch >= 2.9)

from .traced_errors import run_while_tracing

FORWARD = {"fxtrain": "forward"}
"""The annotation on the nodes of a train step's forward (``torch.fx.traceback.annotate``)."""

BACKWARD = {"remat_pass_tag": "is_backward"}
"""The annotation on the nodes of a traced ``torch.autograd.grad``: torch 2.11's pass that
recomputes checkpointed regions in a graph holding a forward, its loss and its backward
(``torch._functorch._activation_checkpointing.remat_using_tags_for_fwd_loss_bwd_graph_pass``)
finds the backward by it alone, and without it recomputed nothing: ``fx.remat`` kept every
activation (a GPT-2 on an H200, torch 2.11: 76.2 GiB with remat per block against 63.5 without).
Torch 2.13 finds the backward by the ``autograd_backward`` Dynamo sets, and there the key is
not set: with it, each checkpointed region's recomputation read as a backward region of its own
("Detected 3 disjoint backward regions", a transformers model's own checkpointing, compiled)."""

CHAIN = 16
"""The most ops one recomputed tensor may repeat, counting the recomputed ops it reads."""


def _forward(node: fx.Node) -> bool:
    custom = node.meta.get("custom") or {}
    return custom.get("fxtrain") == "forward" and not node.meta.get("autograd_backward")


def _itemsize(value: Any) -> int:
    return value.dtype.itemsize if isinstance(value, torch.Tensor) else 0


_CONSTANTS = frozenset({"full", "scalar_tensor", "zeros", "ones", "arange", "iota"})
"""Ops that make a tensor from numbers and a shape only (``torch.zeros_like`` is ``full`` after
Inductor's decompositions): made again for the backward rather than kept alive until it."""


def _cheap(node: fx.Node) -> bool:
    """An element-wise op, a view or a constant, pure, whose output is no narrower than its
    inputs."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.name.split("::")[-1] in _CONSTANTS:
        return True
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bool:
        return False
    if not (target.is_view or torch.Tag.pointwise in target.tags):
        return False
    return all(_itemsize(i.meta.get("val")) <= value.dtype.itemsize for i in node.all_input_nodes)


def recompute(graph: fx.Graph) -> None:
    """Gives each node outside the forward copies of the cheap forward nodes it reads (see the
    module's docstring); a graph with no annotated forward is left as it is."""
    nodes = list(graph.nodes)
    chain: dict[fx.Node, int] = {}  # cheap forward node -> the ops its recomputation repeats
    for node in nodes:
        if _forward(node) and _cheap(node):
            length = 1 + sum(chain.get(i, 0) for i in node.all_input_nodes)
            if length <= CHAIN:
                chain[node] = length
    if not chain:
        return
    copies: dict[fx.Node, fx.Node] = {}

    def copy(node: fx.Node) -> fx.Node:
        if node not in chain:
            return node
        if node not in copies:  # inserted where the reader is (graph.inserting_before)
            made = graph.call_function(node.target, fx.map_arg(node.args, copy),
                                       fx.map_arg(node.kwargs, copy))
            made.meta = {**node.meta, "custom": {}}
            copies[node] = made
        return copies[node]

    for node in nodes:
        if node.op == "call_function" and not _forward(node) and \
                any(i in chain for i in node.all_input_nodes):
            with graph.inserting_before(node):
                node.args = fx.map_arg(node.args, copy)
                node.kwargs = fx.map_arg(node.kwargs, copy)
    for node in reversed(nodes):  # the forward's own, if nothing reads them now
        if node in chain and not node.users:
            graph.erase_node(node)


@functools.cache
def _pass() -> Any:
    """``recompute`` as an Inductor pass, its key in Inductor's caches this file's hash (made on
    first use: Inductor's module takes a second to import, which an eager run never needs)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class Recompute(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            recompute(graph)

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__,))

    ours = Recompute()

    class After(CustomGraphPass):
        """A pass the user had set, then ``recompute``."""

        def __init__(self, first):
            self.first = first

        def __call__(self, graph: fx.Graph) -> None:
            self.first(graph)
            recompute(graph)

        def uuid(self) -> Any:  # None: Inductor does not cache the graph
            first = self.first.uuid() if isinstance(self.first, CustomGraphPass) else None
            return None if first is None else (first, ours.uuid())

    return ours, After


def marked(compute: Callable) -> Callable:
    """``compute`` (a step's forward), its nodes annotated ``FORWARD`` and ``recompute``
    installed while Dynamo traces it; eagerly, or on a torch without ``annotate`` (before 2.9),
    ``compute`` as it is."""
    annotate = getattr(torch.fx.traceback, "annotate", None)
    if annotate is None:
        return compute

    def forward(*args: Any) -> Any:
        if not torch.compiler.is_compiling():
            return compute(*args)
        install()
        with annotate(FORWARD):
            return compute(*args)

    return forward


def backward_marked() -> Any:
    """A context for a traced ``torch.autograd.grad``: its nodes annotated ``BACKWARD`` while
    Dynamo traces it on torch before 2.13, so that checkpointed regions (``fx.remat``,
    ``torch.utils.checkpoint``) are recomputed there; eagerly, from 2.13 on, or on a torch
    without ``annotate``, nothing."""
    from .version import at_least
    annotate = getattr(torch.fx.traceback, "annotate", None)
    if annotate is None or not torch.compiler.is_compiling() or at_least(2, 13):
        return contextlib.nullcontext()
    return annotate(BACKWARD)


@run_while_tracing
def install() -> bool:
    """Sets ``recompute`` as Inductor's post-grad pre-pass, after one the user set (run for
    real while Dynamo traces a step: ``fxtrain.step._autodiff``)."""
    import torch._inductor.config as inductor

    ours, after = _pass()
    current = inductor.post_grad_custom_pre_pass
    if current is None:
        inductor.post_grad_custom_pre_pass = ours
    elif current is not ours and not isinstance(current, after):
        inductor.post_grad_custom_pre_pass = after(current)
    return True
