"""``Stream``: batches cut from a stream of examples, in one order whatever the number of ranks.

An iterable dataset (a file read line by line, a Hugging Face streaming dataset, a generator of
packed rows) has no length to permute and no index to jump to, so ``Batches`` cannot take it, and
a ``DataLoader`` over it splits the stream by worker and rank, so which examples a step sees
depends on the layout. ``Stream`` defines the order once: epoch ``e`` is one pass over the
examples (through a seeded shuffle buffer if asked), cut into global batches of ``batch_size *
world_size`` consecutive examples, and rank ``r`` takes the ``r``-th ``batch_size`` of each. Its
position is a ``DataPosition`` counting the examples of the epoch behind it, so a run resumed
on another number of ranks (or another batch size) goes on from the same example of the same
order, as ``Batches`` does.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ._position import DataPosition, Share, index_tensor, read_share, shard_of, unit_tensor

__all__ = ["Stream"]

_END = object()


class Stream:
    """Batches of a stream of examples, split across ranks by one global order.

    Args:
      examples: what one epoch reads, example by example: an iterable read again each epoch
        (a list, a ``torch.utils.data.IterableDataset``, a Hugging Face ``IterableDataset``),
        or a function ``epoch -> iterable`` (to read another order or another file each epoch).
        Not a one-shot iterator: a resume opens the epoch again.
      batch_size: examples per batch on each rank; the global batch is ``batch_size *
        world_size``.
      collate: joins a rank's list of examples into a batch (default
        ``torch.utils.data.default_collate``: dicts of tensors stack into a dict of tensors).
      shard: ``(rank, world_size)``; None (default): this process's rank and world size when
        torch.distributed is initialized; False: every rank reads everything.
      drop_last: an epoch's last global batch is dropped when short (keeps shapes static);
        without it the last one is cut short, and a rank with no example of it raises.
      shuffle_buffer: examples held in a buffer that yields a random one of them as each new one
        comes (the streaming shuffle); its generator is seeded with ``(seed, epoch)``, so the
        order is a function of the examples, the seed and the epoch alone. 0: in stream order.
      seed: the shuffle buffer's seed.
      seek: ``(epoch, start) -> iterable`` giving epoch ``epoch``'s examples from its
        ``start``-th: for a source that can jump (a file offset, ``datasets``' ``skip``), used
        when a run resumes mid-epoch instead of reading and dropping the examples before it.
        Not with a shuffle buffer (the shuffled order cannot be entered midway).

    Every rank reads every example of the stream and collates its own share only, so the order
    does not depend on the layout; a source that costs more to read than to train on should be
    split into files that ``examples(epoch)`` reads lazily. Resuming mid-epoch reads the epoch
    again up to the position (unless ``seek``): exact for a source that gives the same examples
    on every read of an epoch.

    Examples:
        >>> rows = [{"x": torch.tensor([i])} for i in range(10)]
        >>> one = fx.data.Stream(rows, batch_size=4)
        >>> batch, position, epoch_done = one.next(one.init())
        >>> batch["x"].flatten().tolist(), position
        ([0, 1, 2, 3], DataPosition(epoch=tensor(0), index=tensor(1), batch=tensor(4)))
        >>> halves = [fx.data.Stream(rows, batch_size=2, shard=(r, 2)) for r in range(2)]
        >>> [s.next(position)[0]["x"].flatten().tolist() for s in halves]  # the same next 4
        [[4, 5], [6, 7]]
    """

    def __init__(self, examples: Iterable | Callable[[int], Iterable], batch_size: int, *,
                 collate: Callable | None = None, shard: tuple[int, int] | bool | None = None,
                 drop_last: bool = True, shuffle_buffer: int = 0, seed: int = 0,
                 seek: Callable[[int, int], Iterable] | None = None):
        if isinstance(examples, Iterator):
            raise TypeError("Stream: examples is a one-shot iterator, which a resume or a second "
                            "epoch cannot read again; pass a function of the epoch that makes "
                            "it (lambda epoch: ...) or an iterable (a list, an IterableDataset)")
        is_iterable = isinstance(examples, Iterable) and not isinstance(examples, str | bytes)
        if not is_iterable and not callable(examples):
            raise TypeError(f"Stream: examples must be an iterable or a function epoch -> "
                            f"iterable, got {type(examples).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Stream: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) \
                or shuffle_buffer < 0:
            raise ValueError(f"Stream: shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        if seek is not None and shuffle_buffer:
            raise ValueError("Stream: seek cannot enter a shuffle buffer's order midway; pass "
                             "one of seek and shuffle_buffer")
        self.shard = shard
        shard_of(shard, "Stream")  # a shard that can never be one is refused here
        self.examples, self.seek = examples, seek
        self._by_epoch = not is_iterable  # a function of the epoch
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.collate = collate or torch.utils.data.default_collate
        self.repeats = True  # epochs follow one another until the loop stops
        self._it: Iterator = iter(())
        self._cursor = (0, 0)  # (epoch, examples of it before ``_ahead``)
        self._epoch_tensor = torch.zeros((), dtype=torch.int64)
        self._ahead: list | None = []  # the next global batch's examples; None: not read yet
        self._last: DataPosition | None = None  # the position ``_cursor`` stands at
        self._reading: Share | None = None  # the share ``_ahead`` was read for

    def __len__(self) -> int:
        """Batches per epoch, when the examples are an iterable with a length."""
        return self.batches()

    def batches(self, share: Share | None = None) -> int:
        """Batches per epoch of a rank reading ``share`` (``read_share``), when the examples
        are an iterable with a length."""
        if self._by_epoch:
            raise TypeError("Stream: a function of the epoch has no length")
        size = self.batch_size * read_share(self.shard, "Stream", share)[1]
        full, rest = divmod(len(self.examples), size)  # TypeError: no length
        return full + (1 if rest and not self.drop_last else 0)

    def _reads(self, share: Share | None) -> Share:
        """The share this call reads (``read_share``); where it is not the one the examples
        read ahead were cut for, the stream opens again at the position it is given."""
        share = read_share(self.shard, "Stream", share)
        if share != self._reading:
            self._reading, self._last = share, None
        return share

    def init(self) -> DataPosition:
        """The position at the start of the first epoch."""
        return DataPosition.start()

    def order(self, epoch: int) -> Iterator:
        """Epoch ``epoch``'s examples in the order the ranks share them (read lazily)."""
        source = self.examples(epoch) if self._by_epoch else self.examples
        if self._by_epoch and (not isinstance(source, Iterable) or isinstance(source, str | bytes)):
            name = getattr(self.examples, "__qualname__", type(self.examples).__name__)
            raise TypeError(f"Stream: examples({epoch}) ({name}) returned "
                            f"{'None' if source is None else type(source).__name__}, not an "
                            f"iterable of examples; return epoch {epoch}'s examples (a list, a "
                            "generator, an IterableDataset)")
        examples = iter(source)
        if self.shuffle_buffer:
            seed = (self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF
            examples = _shuffled(examples, self.shuffle_buffer, random.Random(seed))
        return examples

    def next(self, position: DataPosition,
             share: Share | None = None) -> tuple[Any, DataPosition, bool]:
        """This rank's batch at ``position``, the position after it, and whether it ended an
        epoch. StopIteration never: epochs follow one another (``fit`` stops the run).
        ``share``: the ``(rank, world_size)`` to read as, for a stream made without a ``shard``
        (``fit`` passes its state's); None: this process's."""
        rank, world = self._reads(share)
        size = self.batch_size * world
        rolled = False if position is self._last else self._enter(position, world)
        epoch, offset = self._cursor
        if self._ahead is None:  # the epoch the last batch ended begins: read it now
            self._open(epoch, 0, world, fresh=True)
        examples = self._ahead
        mine = examples[rank * self.batch_size:(rank + 1) * self.batch_size]
        if not mine:
            raise ValueError(f"Stream: the last batch of epoch {epoch} ({len(examples)} examples "
                             f"over {world} ranks) leaves rank {rank} none; "
                             "pass drop_last=True")
        batch = self._collated(mine, epoch, offset + rank * self.batch_size)
        end = offset + len(examples)
        self._ahead = self._fill(size)
        done = not self._enough(self._ahead, size)
        if done:  # the next epoch is read when its first batch is asked for
            self._cursor, self._ahead = (epoch + 1, 0), None
            self._epoch_tensor = torch.tensor(epoch + 1, dtype=torch.int64)
            new = DataPosition(self._epoch_tensor, index_tensor(0), unit_tensor(size))
        else:  # counted in global batches; in a resumed epoch cut elsewhere, in their gcd
            self._cursor = (epoch, end)
            unit = math.gcd(end, size)
            new = DataPosition(self._epoch_tensor, index_tensor(end // unit), unit_tensor(unit))
        self._last = new
        return batch, new, done or rolled

    def settle(self, position: DataPosition, share: Share | None = None) -> DataPosition:
        """``position``, or the start of the next epoch when its epoch has no batch left here
        (resumed on a larger global batch than the one that wrote it): what ``fit`` starts from.
        Opens the stream at ``position``, so the first ``next`` reads on from there."""
        world = self._reads(share)[1]
        if position is self._last:
            return position
        if self._enter(position, world):
            position = DataPosition(self._epoch_tensor, index_tensor(0),
                                    unit_tensor(self.batch_size * world))
        self._last = position
        return position

    def skip_epoch(self, position: DataPosition, share: Share | None = None) -> DataPosition:
        """The start of the epoch after ``position``'s (``Control.stop_epoch``)."""
        world = read_share(self.shard, "Stream", share)[1]
        return DataPosition(torch.tensor(int(position.epoch) + 1, dtype=torch.int64),
                            index_tensor(0), unit_tensor(self.batch_size * world))

    def __iter__(self) -> Iterator:
        """One pass over epoch 0, this rank's batches (for eval data and plain loops)."""
        position, done = self.init(), False
        while not done:
            batch, position, done = self.next(position)
            yield batch

    def _enter(self, position: DataPosition, world: int) -> bool:
        """Open the stream at ``position`` (made elsewhere: a new run, a resume) for ``world``
        ranks; whether its epoch had no batch left (then the stream stands at the next epoch's
        start)."""
        if not isinstance(position, DataPosition):
            raise TypeError(f"Stream.next needs a DataPosition (state.data), got "
                            f"{type(position).__name__}; start with state.replace(data="
                            "stream.init())")
        epoch, index, unit = int(position.epoch), int(position.index), int(position.batch)
        if epoch < 0 or index < 0 or unit < 0:
            raise ValueError(f"Stream: position {position} has a negative field")
        size = self.batch_size * world
        if unit and unit != size:
            logging.getLogger("fxtrain").info(
                "resuming epoch %d at example %d of its order (counted in batches of %d; this "
                "stream's global batch is %d)", epoch, index * unit, unit, size)
        offset = index * (unit or size)
        self._open(epoch, offset, world)
        if self._enough(self._ahead, size):
            return False
        if not offset:
            raise ValueError(f"Stream: epoch {epoch} holds no {self._describe(world)}")
        self._open(epoch + 1, 0, world, fresh=True)
        return True

    def _open(self, epoch: int, start: int, world: int, fresh: bool = False) -> None:
        """Stand at example ``start`` of ``epoch``, the next global batch read ahead."""
        if self.seek is not None and start:
            self._it = iter(self.seek(epoch, start))
        else:
            self._it = self.order(epoch)
            if start:
                logging.getLogger("fxtrain").info("resuming: reading past %d examples of "
                                                  "epoch %d", start, epoch)
            for skipped in range(start):
                if next(self._it, _END) is _END:
                    raise ValueError(f"Stream: the position is {start} examples into epoch "
                                     f"{epoch}, which holds only {skipped} (was the data "
                                     "changed?)")
        self._cursor = (epoch, start)
        self._epoch_tensor = torch.tensor(epoch, dtype=torch.int64)
        size = self.batch_size * world
        self._ahead = self._fill(size)
        if fresh and not self._enough(self._ahead, size):
            raise ValueError(f"Stream: epoch {epoch} holds no {self._describe(world)}")

    def _collated(self, examples: list, epoch: int, first: int) -> Any:
        """``collate(examples)``, the ``first``-th example of ``epoch`` the first of them; an
        error names them and the first example shaped otherwise than the first."""
        try:
            return self.collate(examples)
        except Exception as e:
            shapes = [_shape(example) for example in examples]
            odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
            differs = "" if odd is None else (f": example {first + odd} is {shapes[odd]}, "
                                              f"example {first} {shapes[0]}")
            name = getattr(self.collate, "__qualname__", type(self.collate).__name__)
            raise ValueError(f"Stream: examples {first} to {first + len(examples) - 1} of "
                             f"epoch {epoch} do not collate into a batch ({type(e).__name__}: "
                             f"{e}){differs}; make every example the same structure, or pass a "
                             f"collate that joins them (collate is {name})") from e

    def _describe(self, world: int) -> str:
        ranks = f" ({self.batch_size} on each of {world} ranks)" if world > 1 else ""
        return (f"full batch of {self.batch_size * world} examples{ranks}" if self.drop_last
                else "example")

    def _fill(self, size: int) -> list:
        return list(itertools.islice(self._it, size))

    def _enough(self, examples: list, size: int) -> bool:
        return len(examples) == size if self.drop_last else bool(examples)



def _shape(example: Any) -> str:
    """What an example is, for an error: a dict with its keys, a tuple with its length..."""
    if isinstance(example, dict):
        return f"a dict with keys {sorted(map(str, example))}"
    if isinstance(example, tuple | list):
        return f"a {type(example).__name__} of {len(example)}"
    if isinstance(example, torch.Tensor):
        return f"a tensor of shape {tuple(example.shape)}"
    return f"a {type(example).__name__}"


def _shuffled(examples: Iterator, size: int, rng: random.Random) -> Iterator:
    """``examples`` through a buffer of ``size``: each new one takes the place of a random one
    of the buffer, which comes out; the rest come out shuffled at the end."""
    buffer: list = []
    for example in examples:
        if len(buffer) < size:
            buffer.append(example)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = example
    rng.shuffle(buffer)
    yield from buffer
