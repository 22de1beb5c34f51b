"""``Shared``: a ``Batches`` or ``Stream`` read as one data replica's share of each global
batch, the share passed to every call. The stream itself describes the global order and holds
no rank; ``fit`` reads its data through ``as_stream(data, state.layout)``, which pairs the
stream with the share the state's layout gives this process (``shard_of(None, ..., layout)``), so
``fx.shard`` may come after the stream was made, and one stream may feed states of several
layouts."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._position import DataPosition, Share


@dataclasses.dataclass(frozen=True)
class Shared:
    """``stream`` read as the data replica ``share`` (``(rank, world_size)``): the stream
    protocol (``init``, ``next``, ``batch_size``, ``repeats``, ``len``), each call passing the
    share; a stream made with its own ``shard`` keeps that one.

    Examples:
        >>> data = fx.data.Batches(torch.arange(8), batch_size=2, shuffle=False)
        >>> halves = [fx.data.Shared(data, (rank, 2)) for rank in range(2)]
        >>> [h.next(h.init())[0].tolist() for h in halves], len(halves[0]), len(data)
        ([[0, 1], [2, 3]], 2, 4)
    """

    stream: Any
    share: Share

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size

    @property
    def repeats(self) -> bool:
        return self.stream.repeats

    def __len__(self) -> int:
        return self.stream.batches(self.share)

    def init(self) -> DataPosition:
        return self.stream.init()

    def next(self, position: DataPosition) -> tuple[Any, DataPosition, bool]:
        return self.stream.next(position, self.share)

    def next_stacked(self, position: DataPosition, k: int) -> tuple[Any, DataPosition, bool] | None:
        """The stream's ``next_stacked`` where it has one (``Batches``), else None: take the
        ``k`` batches one by one."""
        at_once = getattr(self.stream, "next_stacked", None)
        return None if at_once is None else at_once(position, k, self.share)

    def settle(self, position: DataPosition) -> DataPosition:
        return self.stream.settle(position, self.share)

    def skip_epoch(self, position: DataPosition) -> DataPosition:
        return self.stream.skip_epoch(position, self.share)

    def __iter__(self):
        """One pass over epoch 0, this share's batches."""
        position, done = self.init(), False
        while not done:
            batch, position, done = self.next(position)
            yield batch
