"""``Batches``: a seedable, checkpointable stream of batches whose position lives in the state.

The position is ``DataPosition(epoch, index)``, two 0-d int64 CPU tensors kept in
``state.data``. They are tensors, not Python ints, so passing the state through a compiled step
never recompiles; they live on the CPU, so reading them never syncs with an accelerator. Epoch
``e`` visits the examples in ``randperm(n)`` drawn from a generator seeded with (seed, e), so a
run resumed at any position yields exactly the batches an uninterrupted run would have.

Example::

    data = fx.data.Batches((x, y), batch_size=32, seed=0)
    state = state.replace(data=data.init())
    batch, position, epoch_done = data.next(state.data)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import struct

__all__ = ["DataPosition", "Batches"]


@struct.dataclass
class DataPosition:
    """Where a ``Batches`` stream stands: ``epoch`` and the ``index`` of the next batch in it."""

    epoch: torch.Tensor
    index: torch.Tensor

    @classmethod
    def start(cls) -> DataPosition:
        return cls(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64))


def _tensor_source(data: Any) -> tuple[int, Callable[[torch.Tensor], Any]] | None:
    """Columns: a tensor, or a tuple/dict of tensors indexed along their first dimension.

    A list is a dataset of examples, never columns: ``[img1, img2]`` batches images.
    """
    if not isinstance(data, torch.Tensor | tuple | Mapping):
        return None
    leaves, spec = pytree.tree_flatten(data)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    sizes = {t.shape[0] if t.ndim else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(t.shape) for t in leaves]
        raise ValueError(f"Batches: all tensors need the same first dimension, got shapes {shapes}")
    return sizes.pop(), lambda idx: pytree.tree_unflatten([t[idx] for t in leaves], spec)


def _dataset_source(data: Any, collate: Callable) -> tuple[int, Callable[[torch.Tensor], Any]]:
    if not isinstance(data, Sequence | torch.utils.data.Dataset) or isinstance(data, str):
        raise TypeError(f"Batches needs tensors, a dict/tuple of tensors, or a map-style dataset "
                        f"(__len__ and __getitem__); got {type(data).__name__}")
    try:
        n = len(data)
    except TypeError as e:
        raise TypeError(f"Batches needs a dataset with __len__; {type(data).__name__} has none "
                        "(an iterable-style dataset has no random access to shuffle)") from e
    # idx is a CPU index tensor from randperm/arange: no device sync; datasets want Python ints.
    return n, lambda idx: collate([data[i] for i in idx.tolist()])


class Batches:
    """Batches of ``data``: a tensor, a dict/tuple of tensors, or a map-style dataset.

    Args:
      data: tensors sharing their first dimension (indexed directly, no copies per example), or
        a dataset with ``__len__`` and ``__getitem__`` (examples joined by ``collate``).
      batch_size: examples per batch.
      shuffle: a new permutation each epoch, derived from ``(seed, epoch)``; else in order.
      seed: the shuffling seed.
      drop_last: drop the last batch of an epoch when it is short (keeps shapes static, so a
        compiled step never sees a new shape).
      collate: joins a list of examples into a batch (default ``torch.utils.data.default_collate``).
    """

    def __init__(self, data: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, collate: Callable | None = None):
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size must be >= 1, got {batch_size}")
        source = _tensor_source(data)
        self.size, self._take = source or _dataset_source(
            data, collate or torch.utils.data.default_collate)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self._epoch_order: tuple[int, torch.Tensor] | None = None  # cache of order(epoch)
        if len(self) == 0:
            raise ValueError(f"Batches: {self.size} examples make no batch of {batch_size}"
                             + (" with drop_last=True" if drop_last else ""))

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def init(self) -> DataPosition:
        """The position at the start of the first epoch."""
        return DataPosition.start()

    def order(self, epoch: int) -> torch.Tensor:
        """The example indices of ``epoch``: a function of (seed, epoch) alone."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.size, generator=g)

    def next(self, position: DataPosition) -> tuple[Any, DataPosition, bool]:
        """The batch at ``position``, the position after it, and whether it ended an epoch."""
        if not isinstance(position, DataPosition):
            raise TypeError(f"Batches.next needs a DataPosition (state.data), got "
                            f"{type(position).__name__}; start with state.replace(data=batches.init())")
        epoch, index = int(position.epoch), int(position.index)
        if not 0 <= index < len(self):
            raise ValueError(f"Batches: position index {index} is outside this stream's "
                             f"{len(self)} batches per epoch (was the data or batch size changed?)")
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, self.order(epoch))  # one permutation per epoch, not batch
        start = index * self.batch_size
        batch = self._take(self._epoch_order[1][start:start + self.batch_size])
        done = index + 1 == len(self)
        new = DataPosition(torch.tensor(epoch + done, dtype=torch.int64),
                           torch.tensor(0 if done else index + 1, dtype=torch.int64))
        return batch, new, done

    def __iter__(self):
        """One pass from the start of epoch 0 (for eval data and plain loops)."""
        position = self.init()
        for _ in range(len(self)):
            batch, position, _ = self.next(position)
            yield batch

