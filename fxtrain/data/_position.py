"""``DataPosition``: where a data stream stands, a value in ``state.data``; and the shared pieces
of the streams that make positions (the index tensors, the rank's share of a global batch)."""

from __future__ import annotations

import torch

from .. import distributed, struct

@struct.dataclass
class DataPosition:
    """Where a stream stands: its ``epoch``, and ``index`` batches of ``batch`` examples into it.

    ``batch`` is the global batch size (examples over all ranks) that ``index`` counts, so the
    position names an example of the epoch's order, ``index * batch``, whatever the layout that
    wrote it: a ``Batches`` stream of another batch size or number of processes continues from
    that example. 0: the global batch of the stream that reads it (a position made by hand, or
    one a checkpoint kept before fxtrain recorded the batch). ``IterableStream`` counts the
    iterable's batches in ``index`` and leaves ``batch`` 0.

    Examples:
        >>> position = fx.data.Batches(torch.arange(6), 2).init()
        >>> position
        DataPosition(epoch=tensor(0), index=tensor(0), batch=tensor(0))
    """

    epoch: torch.Tensor
    index: torch.Tensor
    # a checkpoint written before this field restores with the template's (0): see the bridge
    batch: torch.Tensor = struct.field(default_factory=lambda: _UNRECORDED,
                                       metadata={"optional_in_checkpoints": True})

    @classmethod
    def start(cls) -> DataPosition:
        return cls(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64))


_INDICES: list[torch.Tensor] = []  # the index tensors made so far, shared by every position
# ``batch`` of the positions that do not record it: its own tensor, never an index's (a compiled
# step given one tensor in two leaves of its input would compile again for the aliasing)
_UNRECORDED = torch.zeros((), dtype=torch.int64)


def index_tensor(index: int) -> torch.Tensor:
    """The 0-d int64 tensor of a batch index: made once for each of the first 2**16 and shared
    by the positions the streams make (values, never changed in place), so a step's new position
    costs no tensor."""
    if index >= 2**16:
        return torch.tensor(index, dtype=torch.int64)
    while len(_INDICES) <= index:
        _INDICES.append(torch.tensor(len(_INDICES), dtype=torch.int64))
    return _INDICES[index]


Share = tuple[int, int]
"""A data replica's share of a global batch: ``(rank, world_size)``."""


def shard_of(shard: Share | bool | None, who: str,
             layout: distributed.Layout | None = None) -> Share:
    """``(rank, world_size)`` of a stream's ``shard`` argument (see ``Batches``): None takes
    ``layout``'s share of the batch (its data replicas), or while no layout is given, that of a
    state ``fx.shard`` has not touched (every rank a replica)."""
    if shard is None and layout is None:  # every rank a replica: no Layout made per call
        return distributed.rank(), distributed.world_size()
    if shard is None:
        return distributed.data_rank(layout), distributed.data_world_size(layout)
    if shard is False:
        return 0, 1
    ok = isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(x, int) for x in shard)
    if not ok or not 0 <= shard[0] < shard[1]:
        raise ValueError(f"{who}: shard must be (rank, world_size) with 0 <= rank < "
                         f"world_size, None or False; got {shard!r}")
    return shard


def read_share(shard: Share | bool | None, who: str, share: Share | None) -> Share:
    """The share a stream made with ``shard`` reads: its own where it was made with one (False:
    everything), else ``share`` (the caller's: ``fit`` passes the state's), else this
    process's rank and world size (torch.distributed's, or one process)."""
    if shard is None and share is not None:
        return share
    return shard_of(shard, who)


_UNITS: dict[int, torch.Tensor] = {}  # the ``batch`` tensors made so far, by value


def unit_tensor(examples: int) -> torch.Tensor:
    """The 0-d int64 ``batch`` tensor of ``examples``: one per value, shared by the streams'
    positions, never an index tensor (a compiled step given one tensor in two leaves of its
    input would compile again for the aliasing)."""
    if examples not in _UNITS:
        _UNITS[examples] = torch.tensor(examples, dtype=torch.int64)
    return _UNITS[examples]
