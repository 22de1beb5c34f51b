"""``fx.data.Stream``: a stream of examples cut into global batches in one order, whatever the
number of ranks, its position counting examples. The ranks are simulated in one process with
``shard=(rank, world_size)``, but for the gloo test at the end, which resumes a run on 2
processes from 1 and on 1 from 2."""

import logging

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dist_worker
import fxtrain as fx
from helpers import mlp


def ids(n):
    return [{"id": torch.tensor(i)} for i in range(n)]


def streams(examples, batch_size, world_size, **kwargs):
    return [fx.data.Stream(examples, batch_size, shard=(rank, world_size), **kwargs)
            for rank in range(world_size)]


def steps(ranks, position, n):
    """``n`` lock-step ``next`` calls on every rank from ``position`` (every rank must make
    the same positions and flags: rank 0's checkpoint is every rank's): the example ids each
    step showed over all ranks, in rank order, with the flags, and the position after."""
    shown = []
    for _ in range(n):
        taken = [stream.next(position) for stream in ranks]
        assert len({(repr(p), done) for _, p, done in taken}) == 1
        shown.append(([i for batch, _, _ in taken for i in batch["id"].tolist()], taken[0][2]))
        position = taken[0][1]
    return shown, position


def epochs_of(shown):
    """The example ids of each epoch, in order, from ``steps``' record."""
    out, current = [], []
    for batch, done in shown:
        current += batch
        if done:
            out.append(current)
            current = []
    return out + ([current] if current else [])


@settings(max_examples=40, deadline=None)
@given(size=st.integers(4, 60), old=st.tuples(st.integers(1, 5), st.integers(1, 4)),
       new=st.tuples(st.integers(1, 5), st.integers(1, 4)), cut=st.integers(1, 40),
       buffer=st.sampled_from([0, 1, 7]), drop_last=st.booleans())
def test_a_resumed_stream_goes_on_with_the_same_examples_whatever_its_layout(
        size, old, new, cut, buffer, drop_last):
    """Any sizes, batch sizes, world sizes, shuffle buffers and cut points: the examples shown
    before the cut on one layout and after it on another are, epoch by epoch, the order one
    process reads, every example once (but a dropped short end)."""
    assume(size >= max(old[0] * old[1], new[0] * new[1]) if drop_last else True)
    # a short last batch may leave a rank no example: refused (tested below)
    assume(drop_last or old[1] == new[1] == 1)
    kwargs = dict(shuffle_buffer=buffer, seed=5, drop_last=drop_last)
    before = streams(ids(size), *old, **kwargs)
    shown, position = steps(before, before[0].init(), cut)
    after = streams(ids(size), *new, **kwargs)
    settled = after[0].settle(position)
    for stream in after[1:]:
        assert repr(stream.settle(position)) == repr(settled)
    if int(settled.epoch) != int(position.epoch):  # nothing of the epoch left on this layout
        shown[-1] = (shown[-1][0], True)
    position = settled
    rest, _ = steps(after, position, 2 * size // (new[0] * new[1]) + 2)
    for epoch, seen in enumerate(epochs_of(shown + rest)[:-1]):
        full = [int(e["id"]) for e in before[0].order(epoch)]
        assert seen == full[:len(seen)], "not the epoch's order"
        assert len(full) - len(seen) < (max(old[0] * old[1], new[0] * new[1])
                                        if drop_last else 1), "examples left out"


def test_a_shuffle_buffer_orders_each_epoch_by_seed_and_epoch_alone():
    stream = fx.data.Stream(list(range(100)), 10, shuffle_buffer=16, seed=3)
    first, second = list(stream.order(0)), list(stream.order(1))
    assert sorted(first) == list(range(100)) and first != list(range(100)) and first != second
    assert first == list(fx.data.Stream(list(range(100)), 5, shuffle_buffer=16, seed=3).order(0))
    assert first != list(fx.data.Stream(list(range(100)), 10, shuffle_buffer=16, seed=4).order(0))
    # a buffer of 16 moves an example at most 16 places ahead of where the stream had it
    assert all(i - first.index(i) <= 16 for i in range(100))


def test_a_function_of_the_epoch_is_read_for_each_epoch_and_seek_skips_the_reading():
    asked = []

    def examples(epoch):
        asked.append(epoch)
        return [epoch * 100 + i for i in range(6)]

    def seek(epoch, start):
        asked.append((epoch, start))
        return examples(epoch)[start:]

    stream = fx.data.Stream(examples, 2)
    position, batches = stream.init(), []
    for _ in range(4):
        batch, position, _ = stream.next(position)
        batches.append(batch.tolist())
    assert batches == [[0, 1], [2, 3], [4, 5], [100, 101]] and asked == [0, 1]
    seeking = fx.data.Stream(examples, 2, seek=seek)
    asked.clear()
    assert seeking.next(position)[0].tolist() == [102, 103] and asked == [(1, 2), 1]


def test_a_resumed_stream_rolls_to_the_next_epoch_when_its_epoch_has_no_full_batch_left():
    small = fx.data.Stream(list(range(10)), 2)  # global 2: the position is 8 examples in
    position = small.init()
    for _ in range(4):
        _, position, _ = small.next(position)
    assert int(position.index) * int(position.batch) == 8
    large = fx.data.Stream(list(range(10)), 4)  # 2 left, a batch of 4 needs more
    settled = large.settle(position)
    assert (int(settled.epoch), int(settled.index)) == (1, 0)
    assert large.next(settled)[0].tolist() == [0, 1, 2, 3]
    # without settle, next says the batch it gives ended an epoch
    batch, _, done = fx.data.Stream(list(range(10)), 4).next(position)
    assert batch.tolist() == [0, 1, 2, 3] and done


def test_the_length_is_known_only_for_data_that_has_one():
    assert len(fx.data.Stream(list(range(10)), 3)) == 3
    assert len(fx.data.Stream(list(range(10)), 3, drop_last=False)) == 4
    assert len(fx.data.Stream(list(range(10)), 2, shard=(0, 2))) == 2
    with pytest.raises(TypeError):
        len(fx.data.Stream(lambda epoch: range(10), 3))


def test_bad_streams_and_positions_are_refused_naming_the_problem():
    with pytest.raises(TypeError, match="one-shot iterator"):
        fx.data.Stream(iter(range(10)), 2)
    with pytest.raises(TypeError, match="iterable or a function"):
        fx.data.Stream(3, 2)
    with pytest.raises(ValueError, match="batch_size"):
        fx.data.Stream(range(10), 0)
    with pytest.raises(ValueError, match="seek cannot"):
        fx.data.Stream(range(10), 2, shuffle_buffer=4, seek=lambda e, s: range(s, 10))
    with pytest.raises(ValueError, match="shard must be"):
        fx.data.Stream(range(10), 2, shard=(2, 2))
    with pytest.raises(ValueError, match="epoch 0 holds no full batch of 12 examples"):
        fx.data.Stream(list(range(10)), 6, shard=(0, 2)).next(fx.data.DataPosition.start())
    with pytest.raises(TypeError, match="needs a DataPosition"):
        fx.data.Stream(list(range(10)), 2).next({"epoch": 0})
    far = fx.data.DataPosition(torch.tensor(0), torch.tensor(9), torch.tensor(2))
    with pytest.raises(ValueError, match="18 examples into epoch 0, which holds only 10"):
        fx.data.Stream(list(range(10)), 2).next(far)
    short = fx.data.Stream(list(range(9)), 2, shard=(1, 2), drop_last=False)
    position = short.init()
    for _ in range(2):
        _, position, _ = short.next(position)
    with pytest.raises(ValueError, match="leaves rank 1 none; pass drop_last=True"):
        short.next(position)


def test_an_epoch_that_reads_nothing_stops_with_an_error_only_when_its_batch_is_asked_for():
    once = iter([list(range(4))])  # the second epoch's read finds nothing
    stream = fx.data.Stream(lambda epoch: next(once, []), 2)
    position = stream.init()
    _, position, _ = stream.next(position)
    _, position, done = stream.next(position)
    assert done and int(position.epoch) == 1  # the last batch of epoch 0: fine
    with pytest.raises(ValueError, match="epoch 1 holds no full batch of 2 examples"):
        stream.next(position)


def test_fit_on_a_stream_of_packed_rows_resumes_bit_identically(tmp_path, caplog):
    """Documents packed as they stream (fx.data.packed_rows), a shuffle buffer, and a model of
    one's own; a run stopped at step 5 and resumed to 11 ends where an uninterrupted one does,
    bit for bit (the same code path on the same machine), reading the epoch again to the
    position."""
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(1, 30, (int(n),), generator=g).tolist()
                 for n in torch.randint(3, 20, (40,), generator=g)]

    def rows(epoch):
        return fx.data.packed_rows(documents, 16)

    def loss_fn(state, params, batch):
        logits = state.apply(params, batch["input_ids"])
        return fx.losses.causal_lm(logits, batch["labels"])

    def run(directory, max_steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Linear(8, 30))
        state = fx.TrainState.create(model, fx.optim.adamw(1e-2))
        with fx.checkpoint.CheckpointManager(directory, async_save=False) as manager:
            return fx.fit(state, fx.make_train_step(loss_fn),
                          fx.data.Stream(rows, 4, shuffle_buffer=5, seed=1),
                          max_steps=max_steps, checkpoint=manager,
                          callbacks=[fx.callbacks.checkpoint_policy(every=5)])

    whole = run(tmp_path / "whole", 11)
    run(tmp_path / "cut", 5)
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        resumed = run(tmp_path / "cut", 11)
    assert "reading past 20 examples of epoch 0" in caplog.text
    assert int(whole.data.epoch) == 1  # the epoch rolled over inside the run
    assert fx.tree_digest(resumed) == fx.tree_digest(whole)


def test_examples_that_do_not_collate_are_named_with_their_epoch_and_place():
    """Issue 60, hole 7: torch's collate errors (KeyError: 'x', tuple indices must be integers)
    and an epoch function returning None ('NoneType' object is not iterable) named no example,
    epoch or function."""
    rows = [{"x": torch.tensor([i])} for i in range(8)]
    rows[6] = {"y": torch.tensor([6])}
    stream = fx.data.Stream(rows, batch_size=4)
    _, position, _ = stream.next(stream.init())
    with pytest.raises(ValueError, match=r"Stream: examples 4 to 7 of epoch 0 do not collate "
                                         r"into a batch \(KeyError: 'x'\): example 6 is a dict "
                                         r"with keys \['y'\], example 4 a dict with keys \['x'\]"):
        stream.next(position)
    mixed = [{"x": torch.tensor([0])}, (torch.tensor([1]),)]
    with pytest.raises(ValueError, match=r"examples 0 to 1 of epoch 0 do not collate .*"
                                         r"tuple indices must be integers.*example 1 is a "
                                         r"tuple of 1, example 0 a dict with keys \['x'\]"):
        next(iter(fx.data.Stream(mixed, batch_size=2)))

    def nothing(epoch):
        return None

    with pytest.raises(TypeError, match=r"Stream: examples\(0\) \(.*nothing\) returned None, "
                                        r"not an iterable of examples; return epoch 0's "
                                        r"examples"):
        next(iter(fx.data.Stream(nothing, batch_size=2)))
