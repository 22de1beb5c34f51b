"""CUDA graphs for a train step: replay one captured step instead of launching its kernels.

On a GPU a small step is bound by the host: Python, Dynamo's guards and one launch per kernel.
A CUDA graph records the step's kernels once and replays them with one launch. It needs every
input and output at a fixed address, which donation gives: a donating step writes the new
state into the old state's storage, so the state's tensors stay where they are from one step
to the next. ``cuda_graphed(step)`` runs ``warmup`` ordinary calls (the first compiles), then
captures one call into a graph; later calls copy the batch into the graph's own batch buffers,
replay, and return a state on the same tensors (the given state is donated, as always) and
the metrics copied out of the graph's memory (the next replay overwrites it).

A batch of other shapes, dtypes or devices than the captured one (a short last batch) runs the
step itself, donating, which keeps the state's addresses. A state on other tensors than the
captured ones (another state, a restored checkpoint) is captured anew. A step that does not
donate every tensor of the state is an error.

What a graph cannot hold is refused when it is captured: a state or batch with tensors off
the GPU (each would be read once, at capture, and never again) or a step that reads the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import donation
from ._spec import step_spec
from ._unguarded import _signature


def _tensors(tree: Any) -> tuple[list, list, Any]:
    """The tensor leaves of ``tree`` with their paths, and its other leaves and structure."""
    flat, spec = pytree.tree_flatten_with_path(tree)
    tensors = [(pytree.keystr(p), v) for p, v in flat if isinstance(v, torch.Tensor)]
    others = [v for _, v in flat if not isinstance(v, torch.Tensor)]
    return tensors, others, spec


class CudaGraphed:
    """``step(state, batch)`` replayed from a CUDA graph (see the module)."""

    def __init__(self, step: Callable, warmup: int):
        self.step = step
        inner = step_spec(step)
        self.donate_kwargs = {"donate": True} if inner.takes_donate else {}
        self.spec = inner.replace(donate=True, cuda_graphs=True)  # it always donates
        self.warmup, self.calls = warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []  # the captured state's tensors, in order
        self.others: list = []  # its other leaves (must not change)
        self.batch: list[torch.Tensor] = []  # the graph's batch buffers
        self.batch_signature: tuple = ()
        self.out_spec = None
        self.kinds: list[bool] = []  # which leaves of the state are tensors
        self.metrics: dict[str, Any] = {}

    def _step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        """One ordinary call, donating (also for steps built with ``donate=None``)."""
        tensors, _, spec = _tensors(state)
        side = torch.cuda.Stream()  # warm on a side stream, as capture runs on one
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                new, metrics = self.step(state, batch, **self.donate_kwargs)
        finally:
            torch.cuda.current_stream().wait_stream(side)
        self._check_donated(tensors, spec, new)
        return new, metrics

    def _check_donated(self, tensors: list, spec: Any, new: Any) -> None:
        news, _, new_spec = _tensors(new)
        if new_spec != spec:
            raise ValueError("cuda_graphed: the step returned a state of another structure than "
                             "it was given (a callback's state changed shape?); a CUDA graph "
                             "needs a fixed structure")
        for (path, old), (_, now) in zip(tensors, news):
            if now is not old:
                raise ValueError(
                    f"cuda_graphed: the step returned a new tensor for state{path} instead of "
                    "writing into the given one; a CUDA graph needs every tensor of the state "
                    "at a fixed address: build the step with donate=True or None (not False), "
                    "and keep each tensor's shape, dtype and device")

    def _capture(self, state: Any, batch: Any) -> tuple[Any, dict]:
        tensors, others, spec = _tensors(state)
        batch_leaves, batch_spec = pytree.tree_flatten(batch)
        for path, t in [*tensors, *((f"batch{pytree.keystr(p)}", v) for p, v in
                                    pytree.tree_flatten_with_path(batch)[0]
                                    if isinstance(v, torch.Tensor))]:
            if t.device.type != "cuda":
                raise ValueError(f"cuda_graphed: {path.lstrip('.')} is on {t.device}; a CUDA "
                                 "graph replays GPU work only, so every tensor of the state "
                                 "and the batch must be on the GPU")
        self.batch = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf
                      for leaf in batch_leaves]
        static_batch = pytree.tree_unflatten(self.batch, batch_spec)
        self.kinds = [isinstance(v, torch.Tensor) for v in pytree.tree_leaves(state)]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                new, metrics = self.step(state, static_batch, **self.donate_kwargs)
        except RuntimeError as e:
            raise RuntimeError(f"cuda_graphed: the step could not be captured into a CUDA "
                               f"graph ({e}); a step that reads values to the host (.item(), "
                               "a Python if on a tensor) or runs CPU work cannot be") from e
        self._check_donated(tensors, spec, new)
        self.graph, self.inputs, self.others = graph, [t for _, t in tensors], others
        self.batch_signature, self.out_spec, self.metrics = _signature(batch), spec, metrics
        graph.replay()  # capturing ran nothing: this is the call's step
        return self._out()

    def _out(self) -> tuple[Any, dict]:
        leaves = iter(self.inputs), iter(self.others)
        new = pytree.tree_unflatten(
            [next(leaves[0]) if is_tensor else next(leaves[1]) for is_tensor in self.kinds],
            self.out_spec)
        metrics = {k: v.clone() if isinstance(v, torch.Tensor) else v
                   for k, v in self.metrics.items()}
        return new, metrics

    def _replayable(self, state: Any, batch: Any) -> bool:
        tensors, others, spec = _tensors(state)
        if spec != self.out_spec or len(tensors) != len(self.inputs):
            return False
        return all(t is c for (_, t), c in zip(tensors, self.inputs)) and others == self.others

    @property
    def steps_per_call(self) -> int:
        return self.spec.steps_per_call

    def __call__(self, state: Any, batch: Any) -> tuple[Any, dict]:
        donation.check_live(state, "train_step")
        self.calls += 1
        if (self.graph is None and self.calls <= self.warmup) or \
                (self.graph is not None and _signature(batch) != self.batch_signature):
            new, metrics = self._step(state, batch)  # warming up, or no graph for this batch
        elif self.graph is None or not self._replayable(state, batch):
            new, metrics = self._capture(state, batch)  # the first, or another state's tensors
        else:
            for buffer, leaf in zip(self.batch, pytree.tree_leaves(batch)):
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(leaf, non_blocking=True)
            self.graph.replay()
            new, metrics = self._out()
        donation.mark(state)
        return new, metrics


def cuda_graphed(train_step: Callable, *, warmup: int = 2) -> Callable[[Any, Any], tuple]:
    """``train_step`` run as a CUDA graph after ``warmup`` ordinary calls (see the module).

    ``train_step`` is a step from ``make_train_step`` (compiled or not; usually
    ``torch.compile(..., fullgraph=True)``) built with ``donate=True`` or ``None``: the
    returned step always donates the state it is given. ``fx.fit`` runs it like any step
    (K steps per call included); a host callback that skips steps cannot be used with it.

    Examples:
        On a machine with a CUDA GPU (the lines marked ``+SKIP`` are not run by the test suite,
        whose machines have none):

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> model = nn.Linear(3, 1)
        >>> state = fx.TrainState.create(model.cuda(), fx.optim.sgd(0.1))  # doctest: +SKIP
        >>> step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)
        >>> step = fx.cuda_graphed(step)  # doctest: +SKIP
        >>> state = fx.fit(state, step, fx.data.Batches((x, y), 16), max_steps=8)  # doctest: +SKIP
        >>> int(state.step)  # doctest: +SKIP
        8
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"cuda_graphed: warmup must be a positive int (the first call "
                         f"compiles, and capturing needs a warm step), got {warmup!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graphed: CUDA graphs need a CUDA GPU, and torch sees none "
                           f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return CudaGraphed(train_step, warmup)
