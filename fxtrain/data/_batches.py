"""``Batches``: a seedable, checkpointable stream of batches whose position lives in the state.

The position is ``DataPosition(epoch, index, batch)``, three 0-d int64 CPU tensors kept in
``state.data``: ``index`` batches of ``batch`` examples into ``epoch``. They are tensors, not
Python ints, so passing the state through a compiled step never recompiles; they live on the CPU,
so reading them never syncs with an accelerator. Epoch ``e`` visits the examples in
``randperm(n)`` drawn from a generator seeded with (seed, e), so a run resumed at any position
yields exactly the batches an uninterrupted run would have; resumed with another batch size or
number of processes, it goes on from the same example of the epoch (see ``Batches``).

Examples:
    >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    >>> data = fx.data.Batches((x, y), batch_size=4, seed=0)
    >>> position = data.init()
    >>> batch, position, epoch_done = data.next(position)
    >>> batch[1], int(position.epoch), int(position.index), epoch_done
    (tensor([4, 1, 7, 5]), 0, 1, False)
    >>> batch, position, epoch_done = data.next(position)
    >>> int(position.epoch), int(position.index), epoch_done
    (1, 0, True)
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import struct
from ._packing import document_mask, pack_documents, packed_rows
from ._position import DataPosition, Share, index_tensor, read_share, shard_of, \
    unit_tensor
from ._shared import Shared
from ._streaming import Stream
from ._feed import to_device

_GATHER_LIMIT = 256 * 2**20  # bytes: smaller tensor data is permuted once per epoch

Take = Callable[[torch.Tensor], Callable[[int, int], Any]]  # epoch order -> (start, stop) -> batch


def _tensor_source(data: Any, device: torch.device | None) -> tuple[int, Take] | None:
    """Columns: a tensor, or a tuple/dict of tensors indexed along their first dimension.

    A list is a dataset of examples, never columns: ``[img1, img2]`` batches images. Data up to
    256 MiB is gathered in epoch order once per epoch and batches are slices of it (views);
    larger data is indexed batch by batch. With a ``device``, data up to 256 MiB moves there
    once (no copy per batch).
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
    small = sum(t.numel() * t.element_size() for t in leaves) <= _GATHER_LIMIT
    if small and device is not None:
        leaves = [t.to(device) for t in leaves]

    def epoch_take(order: torch.Tensor | None) -> Callable[[int, int], Any]:
        if order is None or small:
            columns = leaves if order is None else [t[order] for t in leaves]
            return lambda a, b: pytree.tree_unflatten([t[a:b] for t in columns], spec)
        return lambda a, b: pytree.tree_unflatten([t[order[a:b]] for t in leaves], spec)

    return sizes.pop(), epoch_take


def length_of(x: Any) -> int | None:
    """``len(x)``, or None for data without a length (a generator, an iterable dataset)."""
    try:
        return len(x)
    except TypeError:
        return None


def _dataset_source(data: Any, collate: Callable) -> tuple[int, Take]:
    if not isinstance(data, Sequence | torch.utils.data.Dataset) or isinstance(data, str):
        raise TypeError(f"Batches needs tensors, a dict/tuple of tensors, or a map-style dataset "
                        f"(__len__ and __getitem__); got {type(data).__name__}")
    try:
        n = len(data)
    except TypeError as e:
        raise TypeError(f"Batches needs a dataset with __len__; {type(data).__name__} has none "
                        "(an iterable-style dataset has no random access to shuffle)") from e

    def epoch_take(order: torch.Tensor | None) -> Callable[[int, int], Any]:
        indices = list(range(n)) if order is None else order.tolist()  # CPU: no device sync
        return lambda a, b: collate([data[i] for i in indices[a:b]])

    return n, epoch_take


class Batches:
    """Batches of ``data``: a tensor, a dict/tuple of tensors, or a map-style dataset.

    Args:
      data: tensors sharing their first dimension (up to 256 MiB they are permuted once per
        epoch and batches are views of that copy; larger ones are indexed per batch), or
        a dataset with ``__len__`` and ``__getitem__`` (examples joined by ``collate``).
      batch_size: examples per batch.
      shuffle: a new permutation each epoch, derived from ``(seed, epoch)``; else in order.
      seed: the shuffling seed.
      drop_last: drop the last batch of an epoch when it is short (keeps shapes static, so a
        compiled step never sees a new shape).
      collate: joins a list of examples into a batch (default ``torch.utils.data.default_collate``).
      shard: ``(rank, world_size)``: under data parallelism each epoch's order is cut into
        global batches of ``world_size * batch_size`` examples and rank ``r`` takes the ``r``-th
        ``batch_size`` of each, so the ranks see disjoint examples and together exactly what one
        process with the global batch would. None (default): the share of the state ``fx.fit``
        trains (its ``layout``: each data replica one share; the ranks of a tensor-parallel
        group one between them), and before that this process's rank and world size when
        torch.distributed is initialized; False: every rank reads everything.
        ``batch_size`` is per rank. Without ``drop_last`` the last global batch of an epoch may
        leave some ranks a short or empty batch (fine for evaluation, which weighs by size).
        Resuming on another layout (another ``batch_size`` or number of processes) is exact: see
        below.
      device: where the batches come out (for a loop of your own; ``fit`` moves batches to the
        state's device anyway). Tensor data up to 256 MiB moves there once, at construction;
        other batches are copied one by one (page-locked first for a GPU). The position stays
        on the CPU.

    Resuming on another layout: a position records how many examples of its epoch's order are
    behind it (``index * batch``, ``batch`` being the global batch size of the stream that made
    it), and a stream of any batch size and number of processes goes on from that example. The
    rest of that epoch is cut into this stream's global batches from there, so its batches may
    start off the multiples of the global batch that an epoch begun here would have; the last is
    short, or with ``drop_last`` left out when short, as at the end of any epoch (with
    ``drop_last`` and fewer examples left than a global batch, that epoch is over: ``next`` gives
    the next epoch's first batch and says an epoch ended). Across the ranks every example of the
    epoch is seen once (but for the ``drop_last`` end), in the epoch's order, and the epochs after
    it are this stream's own. A position with ``batch`` 0 (made by hand, or from a checkpoint
    older than that leaf) counts in this stream's global batch.

    Examples:
        >>> data = fx.data.Batches({"x": torch.arange(5)}, batch_size=2, shuffle=False,
        ...                        drop_last=False)
        >>> len(data), [batch["x"].tolist() for batch in data]
        (3, [[0, 1], [2, 3], [4]])
        >>> shuffled = fx.data.Batches(torch.arange(6), batch_size=3, seed=1)
        >>> shuffled.order(0)  # epoch 0's order: a function of (seed, epoch) alone
        tensor([4, 1, 0, 3, 2, 5])
        >>> shuffled.order(0).equal(fx.data.Batches(torch.arange(6), 3, seed=1).order(0))
        True
        >>> two = fx.data.Batches(torch.arange(10), batch_size=2, shuffle=False, shard=(0, 2))
        >>> _, position, _ = two.next(two.init())  # examples 0-3 over both ranks
        >>> position  # one global batch of 4 behind it
        DataPosition(epoch=tensor(0), index=tensor(1), batch=tensor(4))
        >>> one = fx.data.Batches(torch.arange(10), batch_size=3, shuffle=False, drop_last=False)
        >>> [one.next(position)[0].tolist(), one.next(one.next(position)[1])[0].tolist()]
        [[4, 5, 6], [7, 8, 9]]
    """

    def __init__(self, data: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, collate: Callable | None = None,
                 shard: tuple[int, int] | bool | None = None,
                 device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"Batches: batch_size must be >= 1, got {batch_size}")
        self.shard = shard
        shard_of(shard, "Batches")  # a shard that can never be one is refused here
        self.device = None if device is None else torch.device(device)
        source = _tensor_source(data, self.device)
        self._columns = source is not None  # tensors indexed along their first dimension
        self.size, self._take = source or _dataset_source(
            data, collate or torch.utils.data.default_collate)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.repeats = True  # epochs follow one another until the loop stops
        self._epoch: tuple[int, torch.Tensor, Callable] | None = None  # epoch, its tensor, take
        self._last: tuple[DataPosition, int, int] | None = None  # last position made, as ints
        self._check_length()

    def _check_length(self) -> None:
        world = read_share(self.shard, "Batches", None)[1]
        if len(self) == 0:
            raise ValueError(f"Batches: {self.size} examples make no batch of {self.batch_size}"
                             + (f" on each of {world} ranks" if world > 1 else "")
                             + (" with drop_last=True" if self.drop_last else ""))

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return self.batches()

    def batches(self, share: Share | None = None) -> int:
        """Batches per epoch of a rank reading ``share`` (``read_share``: this stream's
        ``shard``, else ``share``, else this process's)."""
        return self._per_epoch(self._global(share))

    def _global(self, share: Share | None) -> int:
        """Examples per step over all the ranks reading ``share``."""
        return self.batch_size * read_share(self.shard, "Batches", share)[1]

    def _per_epoch(self, size: int) -> int:
        full, rest = divmod(self.size, size)
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

    def next(self, position: DataPosition,
             share: Share | None = None) -> tuple[Any, DataPosition, bool]:
        """The batch at ``position``, the position after it, and whether it ended an epoch.
        ``share``: the ``(rank, world_size)`` to read as, for a stream made without a
        ``shard`` (``fit`` passes its state's); None: this process's."""
        rank, world = read_share(self.shard, "Batches", share)
        size = self.batch_size * world
        epoch, offset, rolled = self._where(position, size)
        start = offset + rank * self.batch_size
        batch = self._slice(epoch, start, min(start + self.batch_size, self.size))
        return (batch, *self._after(epoch, offset + size, rolled, size))

    def next_stacked(self, position: DataPosition, k: int,
                     share: Share | None = None) -> tuple[Any, DataPosition, bool] | None:
        """The ``k`` batches from ``position`` stacked along a new first dimension, taken at
        once (a view of tensor data in epoch order), the position after them, and whether they
        ended the epoch; None where one take cannot give them (examples batched by a collate,
        several ranks, a short batch among them, the epoch ending before the last): take them
        one by one with ``next``. What ``fit`` takes for a step of ``steps_per_call=k``.

        Examples:
            >>> data = fx.data.Batches(torch.arange(12), batch_size=2, shuffle=False)
            >>> batches, position, done = data.next_stacked(data.init(), 3)
            >>> batches.tolist(), int(position.index), done
            ([[0, 1], [2, 3], [4, 5]], 3, False)
            >>> data.next_stacked(position, 3)[0].tolist(), data.next_stacked(position, 4)
            ([[6, 7], [8, 9], [10, 11]], None)
        """
        size = self._global(share)
        epoch, offset, rolled = self._where(position, size)
        end = offset + k * self.batch_size
        if not self._columns or size > self.batch_size or end > self.size:
            return None
        batch = self._slice(epoch, offset, end, stacked=k)
        return (batch, *self._after(epoch, end, rolled, size))

    def _where(self, position: DataPosition, size: int) -> tuple[int, int, bool]:
        """``position``'s epoch and example offset as ints (read only for a position made
        elsewhere), and whether that epoch has no batch left here (then: the next epoch's
        start). ``size``: the global batch."""
        if not isinstance(position, DataPosition):
            raise TypeError(f"Batches.next needs a DataPosition (state.data), got "
                            f"{type(position).__name__}; start with state.replace(data=batches.init())")
        if self._last is not None and position is self._last[0]:
            epoch, offset = self._last[1:]  # the position this stream made: no tensor reads
        else:
            epoch, offset = self._read(position, size)
        if self._ended(offset, size):  # drop_last, and a larger global batch than its writer's
            return epoch + 1, 0, True
        return epoch, offset, False

    def _read(self, position: DataPosition, size: int) -> tuple[int, int]:
        """The epoch and example offset a position made elsewhere names, checked."""
        epoch, index, unit = int(position.epoch), int(position.index), int(position.batch)
        per_epoch = self._per_epoch(size)
        if not unit and not 0 <= index < per_epoch:
            raise ValueError(f"Batches: position index {index} is outside this stream's "
                             f"{per_epoch} batches per epoch (was the data or batch size "
                             "changed?)")
        if index < 0 or unit < 0 or index * unit >= self.size:
            raise ValueError(f"Batches: position index {index} in batches of {unit} is "
                             f"{index * unit} examples into an epoch of this stream's {self.size} "
                             "(was the data changed?)")
        if unit and unit != size:
            logging.getLogger("fxtrain").info(
                "resuming epoch %d at example %d of its order (counted in batches of %d; this "
                "stream's global batch is %d)", epoch, index * unit, unit, size)
        return epoch, index * (unit or size)

    def _ended(self, offset: int, size: int) -> bool:
        """Whether an epoch has no batch left after ``offset`` examples (global batch ``size``)."""
        return self.size - offset < (size if self.drop_last else 1)

    def _slice(self, epoch: int, start: int, end: int, stacked: int = 0) -> Any:
        """Examples ``start:end`` of ``epoch``'s order, on the device; ``stacked``: as that many
        batches along a new first dimension."""
        if self._epoch is None or self._epoch[0] != epoch:  # once per epoch
            order = self.order(epoch) if self.shuffle else None
            self._epoch = (epoch, torch.tensor(epoch, dtype=torch.int64), self._take(order))
        batch = self._epoch[2](start, end)
        if stacked:
            batch = pytree.tree_map(lambda t: t.reshape(stacked, -1, *t.shape[1:]), batch)
        if self.device is not None:
            batch = to_device(batch, self.device, pin=True)
        return batch

    def _after(self, epoch: int, end: int, rolled: bool,
               size: int) -> tuple[DataPosition, bool]:
        """The position once ``end`` examples of ``epoch`` are taken, and whether an epoch ended
        (``rolled``: the one before ``epoch``, which had no batch left)."""
        end = min(end, self.size)
        # in an epoch just rolled into, the next call rolls over, unless nothing of it is left
        # (a position at its very end would name no example: the next epoch's start instead)
        done = end >= self.size if rolled else self._ended(end, size)
        if done:
            new = DataPosition(torch.tensor(epoch + 1, dtype=torch.int64), index_tensor(0),
                               unit_tensor(size))
        else:  # counted in global batches; in a resumed epoch cut elsewhere, in their gcd
            unit = math.gcd(end, size)
            new = DataPosition(self._epoch[1], index_tensor(end // unit), unit_tensor(unit))
        self._last = (new, epoch + done, 0 if done else end)
        return new, done or rolled

    def settle(self, position: DataPosition, share: Share | None = None) -> DataPosition:
        """``position``, or the start of the next epoch when its epoch has no batch left here
        (an epoch resumed with ``drop_last`` on a larger global batch than the one that wrote
        it): what ``fit`` starts from, so that no batch of the next epoch is counted in the one
        before it.

        Examples:
            >>> data = fx.data.Batches(torch.arange(10), batch_size=4)  # drop_last: 2 batches
            >>> three = fx.data.DataPosition(torch.tensor(0), torch.tensor(3), torch.tensor(2))
            >>> data.settle(three)  # 6 of 10 examples taken: 4 left, one batch
            DataPosition(epoch=tensor(0), index=tensor(3), batch=tensor(2))
            >>> data.settle(three.replace(index=torch.tensor(4)))  # 8 taken: 2 left, none
            DataPosition(epoch=tensor(1), index=tensor(0), batch=tensor(4))
        """
        if not isinstance(position, DataPosition) or (
                self._last is not None and position is self._last[0]):
            return position
        size = self._global(share)
        epoch, offset = self._read(position, size)
        if not self._ended(offset, size):
            return position
        return DataPosition(torch.tensor(epoch + 1, dtype=torch.int64), index_tensor(0),
                            unit_tensor(size))


    def skip_epoch(self, position: DataPosition, share: Share | None = None) -> DataPosition:
        """The start of the epoch after ``position``'s (``Control.stop_epoch``)."""
        return DataPosition(torch.tensor(int(position.epoch) + 1, dtype=torch.int64),
                            index_tensor(0), unit_tensor(self._global(share)))

    def __iter__(self):
        """One pass from the start of epoch 0 (for eval data and plain loops)."""
        position = self.init()
        for _ in range(len(self)):
            batch, position, _ = self.next(position)
            yield batch


_END = object()


class IterableStream:
    """Any re-iterable (a list of batches, a ``DataLoader``) as a stream with a position.

    The position is a ``DataPosition``: each epoch is one pass over ``iter(data)``. Resuming at
    index ``i`` opens a new pass and skips ``i`` batches, which is exact only when the iterable
    yields the same batches on every pass (no unseeded shuffling); prefer ``Batches``, or a
    ``StatefulDataLoader``, for exact resume. Its batches are whatever the iterable yields, so
    the position cannot say which examples they held: resumed with another batch size or number
    of processes (a loader's ``DistributedSampler`` splits the epoch by the number of ranks), the
    ``i`` batches skipped are other examples, and nothing can tell; resume such data on the
    layout that wrote the checkpoint, or use ``Batches`` (data with a length) or ``Stream`` (a
    stream of examples), whose positions count examples in one order that any layout shares.
    A one-shot iterator ends training when it is exhausted.
    """

    def __init__(self, data: Iterable):
        if not isinstance(data, Iterable) or isinstance(data, str | bytes):
            raise TypeError(f"fit: data must be fx.data.Batches, a StatefulDataLoader or an "
                            f"iterable of batches; got {type(data).__name__}")
        self.data = data
        self.batch_size = None
        self.repeats = not isinstance(data, Iterator)  # a one-shot iterator ends by itself
        self._it: Any = None
        self._last: DataPosition | None = None  # the position this stream made last
        self._count = 0  # its index, as a Python int
        self._ahead: Any = _END

    def __len__(self) -> int:
        return len(self.data)  # TypeError when the iterable has no length

    def init(self) -> DataPosition:
        return DataPosition.start()

    def _open(self, epoch: int, index: int) -> None:
        if index:
            logging.getLogger("fxtrain").info("resuming: skipping %d batches of epoch %d",
                                              index, epoch)
        self._it = iter(self.data)
        for _ in range(index):
            next(self._it)
        self._ahead = next(self._it, _END)

    def skip_epoch(self, position: DataPosition) -> DataPosition:
        """The start of the epoch after ``position``'s: a new pass (``Control.stop_epoch``)."""
        return DataPosition(position.epoch + 1, torch.zeros((), dtype=torch.int64))

    def next(self, position: DataPosition) -> tuple[Any, DataPosition, bool]:
        """The batch at ``position``; StopIteration when there is none (the data ran out)."""
        if not isinstance(position, DataPosition):
            raise TypeError(f"an iterable data stream needs a DataPosition in state.data, got "
                            f"{type(position).__name__}")
        if position is not self._last:  # a new run or a resume: reopen where it points
            self._count = int(position.index)
            self._open(int(position.epoch), self._count)
        batch = self._ahead
        if batch is _END:
            raise StopIteration
        self._ahead = next(self._it, _END)
        done = self._ahead is _END
        epoch = position.epoch + 1 if done else position.epoch
        self._count = 0 if done else self._count + 1
        if done:
            self._it = iter(self.data)  # the next epoch is a new pass
            self._ahead = next(self._it, _END)
        self._last = DataPosition(epoch, index_tensor(self._count))
        return batch, self._last, done


@struct.dataclass
class LoaderPosition:
    """Where a ``StatefulDataLoader`` stands: the epoch and the loader's own ``state_dict()``."""

    epoch: torch.Tensor
    loader: Any = None


class LoaderStream:
    """torchdata's ``StatefulDataLoader``, with its ``state_dict()`` kept in ``state.data``.

    Exact within an epoch; across epochs as exact as the loader's sampler is (a shuffling
    sampler needs a seeded ``generator``). Resumed with another batch size or number of
    processes, the loader's own ``load_state_dict`` decides what it yields; fxtrain does not
    translate its state.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.batch_size = loader.batch_size
        self.repeats = True
        self._it: Any = None
        self._last: Any = None  # the position this stream produced last
        self._ahead: Any = _END

    def __len__(self) -> int:
        return len(self.loader)

    def init(self) -> LoaderPosition:
        return LoaderPosition(torch.zeros((), dtype=torch.int64))

    def _open(self, position: LoaderPosition | None) -> dict:
        if position is not None and position.loader is not None:
            self.loader.load_state_dict(position.loader)
        self._it = iter(self.loader)
        snapshot = self.loader.state_dict()
        self._ahead = next(self._it, _END)
        return snapshot

    def skip_epoch(self, position: LoaderPosition) -> LoaderPosition:
        """The start of the next epoch: a new pass of the loader (``Control.stop_epoch``)."""
        return LoaderPosition(position.epoch + 1, self._open(None))

    def next(self, position: LoaderPosition) -> tuple[Any, LoaderPosition, bool]:
        if not isinstance(position, LoaderPosition):
            raise TypeError(f"a StatefulDataLoader stream needs a LoaderPosition in state.data, "
                            f"got {type(position).__name__}")
        if position is not self._last:
            self._open(position)
        batch = self._ahead
        if batch is _END:
            raise StopIteration
        after = self.loader.state_dict()  # before the look-ahead below moves the loader on
        self._ahead = next(self._it, _END)
        done = self._ahead is _END
        if done:  # start the next epoch now, and keep the loader's state at its start
            new = LoaderPosition(position.epoch + 1, self._open(None))
        else:
            new = LoaderPosition(position.epoch, after)
        self._last = new
        return batch, new, done


def _is_stateful_loader(data: Any) -> bool:
    module = sys.modules.get("torchdata.stateful_dataloader")
    return module is not None and isinstance(data, module.StatefulDataLoader)


def as_stream(data: Any, layout: Any = None) -> Any:
    """``data`` as a stream: ``init()``, ``next(position)``, ``batch_size``, ``repeats``; a
    ``Batches`` or ``Stream`` paired with the share of the global batch ``layout`` gives this
    process (``fit`` passes the state's): ``Shared(data, share)``, which passes the share to
    every call (the stream itself holds no rank); the stream itself where it reads that share
    anyway (made with a ``shard`` of its own, or this process's share is the layout's: one
    process, plain data parallel).

    Every position has an ``epoch`` (a 0-d CPU int64 tensor).
    """
    if isinstance(data, Batches | Stream):
        if layout is None or data.shard is not None:
            return data
        who = type(data).__name__
        share = shard_of(None, who, layout)
        return data if share == shard_of(None, who) else Shared(data, share)
    if isinstance(data, IterableStream | LoaderStream):
        return data
    if _is_stateful_loader(data):
        return LoaderStream(data)
    return IterableStream(data)
