"""``Layout``: how a run's model is laid out over the ranks, one frozen value in the state.

``TrainState.create`` gives a state the layout of one process or of data parallel (every rank a
whole copy): its tied names and whether the model checkpoints its own activations.
``fx.shard`` returns a state with another: the mesh and what each of its dimensions does
(``Roles``), the per-block units and how they gather, the submodules a tensor-parallel plan
splits, and the skeleton before it was prepared to run them. Everything that depends on the
layout reads it from here: the ranks' shares of a batch (``data_rank``, ``data_world_size``),
the step's gradient path (``fxtrain.distributed.strategy``), whether a step needs autograd,
what the forward gathers. Nothing of it lives in a process global or on the module.

Examples:
    >>> state = fx.TrainState.create(nn.Linear(2, 2), fx.optim.sgd(0.1))
    >>> layout = state.layout
    >>> layout.sharded, layout.data_world_size(), layout.data_rank()
    (False, 1, 0)
    >>> layout.needs_autograd
    False
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import _ranks


@dataclasses.dataclass(frozen=True)
class Roles:
    """Which mesh dimension does what (None: no dimension does it): ``shard`` splits the
    parameters (FSDP), ``replicate`` holds copies that train on their own data (HSDP), ``tp``
    runs a tensor-parallel plan."""

    shard: int | None = None
    replicate: int | None = None
    tp: int | None = None

    @property
    def data(self) -> tuple[int, ...]:
        """The dimensions across which ranks train on different data."""
        return tuple(d for d in (self.replicate, self.shard) if d is not None)


@dataclasses.dataclass(frozen=True)
class Gather:
    """How a unit's parameters move: ``param_dtype`` is the dtype they are all-gathered and
    computed in (None: their own), ``reduce_dtype`` the one their gradients are
    reduce-scattered in (None: ``param_dtype``'s, as FSDP2 does). On a 2-D mesh, ``roles``
    says which dimension to gather over, and ``planned`` names the unit's parameters that a
    tensor-parallel plan splits; ``float8`` names the weights it gathers in float8 (torchao's
    ``enable_fsdp_float8_all_gather``: ``fxtrain.distributed._float8_gather``)."""

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    roles: Roles | None = None
    planned: frozenset[str] = frozenset()
    float8: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Context:
    """Context parallelism (``fx.shard(context=...)``, ``fxtrain.distributed._context``): each
    sequence of a batch split over ``size`` ranks, this one holding the slice ``rank`` (a head
    and a tail chunk), attention a ring over ``group``. ``dim`` names the mesh dimension it was
    given as; the parameters shard over it with the dimension before it (``Layout.mesh`` has
    them as one), so its ranks reduce gradients as data ranks do, on one batch share."""

    dim: str
    size: int
    rank: int
    group: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __deepcopy__(self, memo: dict) -> Context:  # a process group is not copied: one value
        return self


@dataclasses.dataclass(frozen=True)
class Layout:
    """The run's parallel layout (see the module): a static field of ``TrainState``.

    Attributes:
      mesh: the ``DeviceMesh`` the parameters are distributed over; None: not distributed
        (one process, or data parallel over every rank of the process group).
      roles: what each of the mesh's dimensions does (``Roles``).
      units: the qualified names of the per-block units (``fx.shard(units=...)``).
      gather: how the units gather their parameters (``Gather``).
      planned: the submodules a tensor-parallel plan splits.
      tied: the groups of names that share one tensor in the model (None: unknown, the module
        could not be copied; ``functional_call`` then ties them).
      checkpointing: whether the model's own activation checkpointing is on (transformers'
        ``gradient_checkpointing_enable()``).
      regions: the blocks a compiled step traces and compiles once for every layer
        (``fx.regional``).
      skeleton: the module before ``fx.shard`` or ``fx.regional`` prepared it (units, plan hooks): what runs the
        whole parameters (evaluation, prediction, the trained module); None: ``state.module``.
      guard: the handle of the skeleton's guard against being called directly
        (``TrainState.create``'s; None: the state runs the model itself): the trained module,
        a copy of the skeleton, goes without it.
      block_update: the blocks' optimizer update as regions, planned by ``fx.regional``
        (``fxtrain.step._region_update.BlockUpdate``); None: the update of the whole tree.
      offload: what lives in host memory (``fx.shard(offload=...)``,
        ``fxtrain.distributed._offload``): ``"optimizer"``, the optimizer state, updated
        there; None: nothing, every tensor on its device.
      frozen: the model's parameters that do not train (``requires_grad=False``: a LoRA's base
        weights), which the state keeps among its buffers: never written by a step, so neither
        copied per step nor averaged over ranks, and ``fx.shard`` shards them as parameters.
      context: context parallelism (``Context``); None: every rank takes whole sequences.
    """

    mesh: Any = None
    roles: Roles = Roles()
    units: tuple[str, ...] = ()
    gather: Gather = Gather()
    planned: tuple[str, ...] = ()
    tied: tuple[tuple[str, ...], ...] | None = ()
    checkpointing: bool = False
    regions: tuple[str, ...] = ()
    skeleton: Any = dataclasses.field(default=None, compare=False, repr=False)
    guard: Any = dataclasses.field(default=None, compare=False, repr=False)
    block_update: Any = dataclasses.field(default=None, compare=False, repr=False)
    offload: str | None = None
    frozen: tuple[str, ...] = ()
    context: Context | None = None

    @property
    def sharded(self) -> bool:
        """Whether the parameters are distributed over a mesh (``fx.shard``)."""
        return self.mesh is not None

    @property
    def two_dimensional(self) -> bool:
        return self.mesh is not None and self.mesh.ndim == 2

    @property
    def tensor_parallel(self) -> bool:
        """Whether a tensor-parallel plan splits some of the model's layers."""
        return bool(self.planned)

    @property
    def needs_autograd(self) -> bool:
        """Whether the step must take autograd's path: units gather inside the forward and
        again in the backward, a plan's DTensors and a 2-D mesh's gathers too, and the model's
        own checkpointing reruns its regions in the backward, and context parallelism's ring
        attention is an ``autograd.Function``; ``torch.func`` hosts none."""
        return bool(self.units) or self.tensor_parallel or self.two_dimensional or \
            self.checkpointing or bool(self.regions) or self.context is not None

    def replace(self, **fields: Any) -> Layout:
        """This layout with ``fields`` changed."""
        return dataclasses.replace(self, **fields)

    def tensor_parallel_size(self) -> int:
        """The ranks that hold one copy of the model between them (they train on one batch)."""
        return self.mesh.size(self.roles.tp) if self.roles.tp is not None else 1

    def data_world_size(self) -> int:
        """The data-parallel replicas: how many shares the global batch is cut into (a
        context-parallel group's ranks take one share between them)."""
        return self.gradient_world_size() // self.context_size()

    def data_rank(self) -> int:
        """This process's share of the global batch: its coordinate over the data dimensions
        (row by row), 0 for a tensor-parallel group's every rank, one for a context-parallel
        group's."""
        return self._gradient_rank() // self.context_size()

    def context_size(self) -> int:
        """The ranks each sequence is split over (``Context``); 1 without."""
        return self.context.size if self.context is not None else 1

    def gradient_world_size(self) -> int:
        """The ranks whose gradients a step averages, each from tokens of its own: the data
        replicas times the context-parallel ranks."""
        if self.mesh is None:
            return _ranks.world_size()
        size = 1
        for d in self.roles.data:  # a loop, not a generator: Dynamo traces this in a step
            size *= self.mesh.size(d)
        return size

    def _gradient_rank(self) -> int:
        if self.mesh is None:
            return _ranks.rank()
        where, rank = self.mesh.get_coordinate(), 0
        for d in self.roles.data:
            rank = rank * self.mesh.size(d) + where[d]
        return rank

    def whole(self) -> Layout:
        """This layout's unsharded counterpart: what runs the whole parameters."""
        return Layout(tied=self.tied, checkpointing=self.checkpointing, guard=self.guard,
                      frozen=self.frozen)

