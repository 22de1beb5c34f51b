"""Resuming a ``Batches`` stream on another layout: another batch size or number of processes.

A position says how far into its epoch's order the run is (``index`` batches of ``batch``
examples), so a stream of any layout continues at that example: across the ranks, every example
of the epoch is seen exactly once, in the epoch's order, and the epochs after it are the new
layout's own. The ranks are simulated in one process with explicit ``shard=(rank, world_size)``.
"""

import logging

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtrain as fx
from fxtrain import struct


def streams(size, batch_size, world_size, drop_last=False, seed=3):
    return [fx.data.Batches(torch.arange(size), batch_size, seed=seed, drop_last=drop_last,
                            shard=(rank, world_size)) for rank in range(world_size)]


def saved(position):
    """The position as a checkpoint gives it back: new tensors, read by a new process."""
    return pytree.tree_map(torch.clone, position)


def run(ranks, position, steps=None):
    """Lock-step ``next`` on every rank from ``position`` for ``steps`` steps (None: to the end
    of the epoch): the examples each step shows over all ranks, the position after, and whether
    the last step ended the epoch. Every rank must make the same positions and flags (rank 0's
    checkpoint is every rank's)."""
    shown, done = [], False
    while not done and (steps is None or len(shown) < steps):
        taken = [stream.next(position) for stream in ranks]
        made = {(*map(int, pytree.tree_leaves(p)), d) for _, p, d in taken}
        assert len(made) == 1, made
        shown.append(torch.cat([batch for batch, _, _ in taken]))
        position, done = taken[0][1], taken[0][2]
    return shown, position, done


def assert_in_order(seen, order):
    """``seen`` is the start of ``order``: each example once, none missing before the end."""
    counts = torch.bincount(seen, minlength=len(order))
    assert torch.equal(seen, order[:len(seen)]), (
        f"{len(seen)} examples shown of {len(order)}: {int((counts > 1).sum())} of them twice, "
        f"{int((counts == 0).sum())} never")


def resumed_epoch(size, old, new, steps, drop_last=False):
    """The examples of epoch 0 shown ``steps`` steps with layout ``old`` (batch, world size),
    then the rest of it with layout ``new`` from the saved position; the position after."""
    before, position, done = run(streams(size, *old, drop_last), streams(size, *old)[0].init(),
                                 steps)
    assert not done
    after, position, done = run(streams(size, *new, drop_last), saved(position))
    assert done and int(position.epoch) == 1 and int(position.index) == 0
    return torch.cat(before + after), after, position


@pytest.mark.parametrize("new", [(16, 4), (32, 1), (16, 3), (16, 2), (8, 1), (48, 1), (7, 5)],
                         ids=lambda layout: f"{layout[0]}x{layout[1]}")
def test_a_layout_change_mid_epoch_shows_every_example_once(new):
    """Two processes of 16 for 7 steps (224 examples), then the new layout: per-process batch
    kept (4 x 16, 3 x 16), global batch kept (1 x 32), others. Before the fix, 4 x 16 read
    index 7 as 7 * 64 examples and never showed 224 of them; 1 x 8 read it as 7 * 8 and showed
    168 twice."""
    order = streams(500, 16, 2)[0].order(0)
    seen, after, _ = resumed_epoch(500, (16, 2), new, steps=7)
    assert_in_order(seen, order)
    assert len(seen) == len(order)
    batch, world = new
    assert [len(b) for b in after[:-1]] == [batch * world] * (len(after) - 1)  # full batches


def test_drop_last_drops_only_the_end_of_the_resumed_epoch():
    order = streams(500, 16, 2)[0].order(0)
    seen, after, _ = resumed_epoch(500, (16, 2), (16, 3), steps=7, drop_last=True)
    assert_in_order(seen, order)
    assert 500 - len(seen) < 48
    assert {len(b) for b in after} == {48}  # static shapes: every batch full


def test_the_epoch_after_a_resumed_one_is_the_new_layouts_own():
    _, _, position = resumed_epoch(500, (16, 2), (16, 3), steps=7)
    ranks = streams(500, 16, 3)
    resumed, position, _ = run(ranks, position)
    fresh, _, _ = run(streams(500, 16, 3), fx.data.DataPosition(torch.tensor(1), torch.tensor(0)))
    assert all(torch.equal(a, b) for a, b in zip(resumed, fresh)) and len(resumed) == len(ranks[0])
    assert torch.equal(torch.cat(resumed), ranks[0].order(1))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(8, 120), old=st.tuples(st.integers(1, 9), st.integers(1, 4)),
       new=st.tuples(st.integers(1, 9), st.integers(1, 4)), cut=st.integers(1, 30),
       drop_last=st.booleans(), again=st.tuples(st.integers(1, 9), st.integers(1, 4)))
def test_any_layouts_any_cut(size, old, new, cut, drop_last, again):
    """Any sizes, batch sizes, world sizes and cut points, resumed twice (the second time from a
    position the first resume made, inside its partial epoch): the epoch's examples in order,
    each once; with drop_last, fewer than a global batch left out at the end."""
    for layout in (old, new, again):
        if size < layout[0] * layout[1] and drop_last:
            return  # no batch at all: Batches refuses such a stream
    ranks = streams(size, *old, drop_last)
    cut = cut % len(ranks[0]) or 1
    if cut >= len(ranks[0]):
        return
    before, position, _ = run(ranks, ranks[0].init(), cut)
    last = new
    middle, position, done = run(streams(size, *new, drop_last), saved(position), 2)
    after = []
    if not done:
        last = again
        after, position, done = run(streams(size, *again, drop_last), saved(position))
    shown = before + middle + after
    rolled = int(position.epoch) == 2 or int(position.index)
    if rolled:  # the epoch had no batch left for the new layout: the last is epoch 1's
        assert drop_last and torch.equal(shown.pop(), streams(size, *last)[0].order(1)[
            :min(size, last[0] * last[1])])
    seen = torch.cat(shown)
    assert_in_order(seen, ranks[0].order(0))
    # epoch 2's start: epoch 1 was one global batch, taken whole with epoch 0's end
    assert int(position.epoch) == 1 or (rolled and int(position.index) == 0)
    assert size - len(seen) < (last[0] * last[1] if drop_last else 1)


def test_an_epoch_with_no_full_batch_left_for_the_new_layout_is_over():
    """drop_last, resumed with a larger global batch than the rest of the epoch: that epoch is
    over. ``next`` gives the next epoch's first batch and says an epoch ended, so a loop counting
    ``epoch_done`` keeps the position's epoch; a one-batch epoch then ends at each call."""
    old = fx.data.Batches(torch.arange(100), 10, seed=1, drop_last=True)
    _, position, _ = run([old], old.init(), 9)  # 90 examples shown, 10 left
    new = fx.data.Batches(torch.arange(100), 64, seed=1, drop_last=True)
    batch, position, done = new.next(saved(position))
    assert torch.equal(batch, new.order(1)[:64]) and done and int(position.epoch) == 1
    batch, position, done = new.next(position)  # epoch 1 had one batch of 64: over too
    assert torch.equal(batch, new.order(2)[:64]) and done and int(position.epoch) == 2
    again = fx.data.Batches(torch.arange(100), 10, seed=1, drop_last=True)
    shown, position, done = run([again], saved(position))  # epoch 2 from 64, 6 left out
    assert torch.equal(torch.cat(shown), again.order(2)[64:94]) and int(position.epoch) == 3


def test_next_stacked_and_skip_epoch_in_a_resumed_epoch():
    """K batches at once from a position written by another layout are the K batches ``next``
    gives one by one (fit's steps_per_call); skipping the epoch goes to the next epoch's start."""
    old = fx.data.Batches(torch.arange(50), 4, seed=2)
    _, position, _ = run([old], old.init(), 3)  # 12 examples: not a multiple of 8
    one, stacked = (fx.data.Batches(torch.arange(50), 8, seed=2) for _ in range(2))
    batches, after, done = stacked.next_stacked(saved(position), 3)
    singles, single_after, _ = run([one], saved(position), 3)
    assert torch.equal(batches, torch.stack(singles)) and not done
    assert [int(x) for x in pytree.tree_leaves(after)] == [0, 9, 4]  # 36 examples, gcd(36, 8)
    assert [int(x) for x in pytree.tree_leaves(single_after)] == [0, 9, 4]
    assert stacked.next_stacked(after, 2) is None  # 36 + 16 > 50: one by one
    skipped = stacked.skip_epoch(after)
    assert [int(x) for x in pytree.tree_leaves(skipped)] == [1, 0, 8]
    assert torch.equal(stacked.next(skipped)[0], stacked.order(1)[:8])


def test_positions_made_elsewhere_are_checked():
    data = fx.data.Batches(torch.arange(50), 8)
    with pytest.raises(ValueError, match="outside this stream's 6 batches per epoch"):
        data.next(fx.data.DataPosition(torch.tensor(0), torch.tensor(6)))  # 48: no batch there
    with pytest.raises(ValueError, match=r"index 13 in batches of 4 is 52 examples into an epoch "
                                         r"of this stream's 50 \(was the data changed\?\)"):
        data.next(fx.data.DataPosition(torch.tensor(0), torch.tensor(13), torch.tensor(4)))


def test_a_position_in_the_state_does_not_recompile_the_step_in_a_resumed_epoch():
    """The compiled step sees the three 0-d CPU tensors of every position: their values change
    (a resumed epoch counts in another unit), never their kind, and no two leaves are one tensor
    (the step would compile again for the aliasing)."""
    step = torch.compile(lambda state, x: (state, x.sum() + state["data"].index),
                         fullgraph=True, backend="eager")
    old = fx.data.Batches(torch.arange(60.0), 5, seed=0)
    _, position, _ = run([old], old.init(), 3)
    new = fx.data.Batches(torch.arange(60.0), 10, seed=0)
    position = saved(position)
    batch, position, _ = new.next(position)
    step({"data": position}, batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(20):  # through the resumed epoch (units of 5) into the next (of 10)
            batch, position, _ = new.next(position)
            step({"data": position}, batch)
    assert int(position.batch) == 10


# ---- through fit and a checkpoint ---------------------------------------------------------------

IDS = torch.arange(100)


def fit(manager, batch_size, max_steps):
    """A fresh process: fit resumes from ``manager``'s latest checkpoint; the examples each
    step trained on, and the epochs fit saw end."""
    shown, ended = [], []

    def step(state, batch):
        shown.append(batch.clone())
        return state.replace(step=state.step + 1), {"loss": torch.zeros(())}

    state = fx.TrainState.create(torch.nn.Linear(1, 1), fx.optim.sgd(0.1))
    end = fx.fit(state, step, fx.data.Batches(IDS, batch_size, seed=1, shard=(0, 1)),
                 max_steps=max_steps, checkpoint=manager, progress=False,
                 callbacks=[lambda s, e: ended.append(e.epoch) if e.kind == "epoch_end" else None])
    return end, shown, ended


def test_fit_resumed_from_a_checkpoint_with_the_batch_size_doubled(tmp_path, caplog):
    """Five steps of 8, saved; a new process with batches of 16 trains the rest of the epoch
    (examples 40 to 88 of its order; drop_last leaves 12 out) and then epoch 1 from its start."""
    order = fx.data.Batches(IDS, 8, seed=1).order
    with fx.checkpoint.CheckpointManager(tmp_path) as manager:
        end, first, _ = fit(manager, 8, 5)
    assert [int(x) for x in pytree.tree_leaves(end.data)] == [0, 5, 8]
    with fx.checkpoint.CheckpointManager(tmp_path) as manager, caplog.at_level(
            logging.INFO, logger="fxtrain"):
        end, rest, ended = fit(manager, 16, 10)
    assert ("resuming epoch 0 at example 40 of its order (counted in batches of 8; this stream's "
            "global batch is 16)") in caplog.text
    assert torch.equal(torch.cat(first + rest[:3]), order(0)[:88]) and ended == [0]
    assert torch.equal(torch.cat(rest[3:]), order(1)[:32])
    assert [int(x) for x in pytree.tree_leaves(end.data)] == [1, 2, 16]


@struct.dataclass
class OldPosition:  # the DataPosition of fxtrain before it recorded the batch
    epoch: torch.Tensor
    index: torch.Tensor


def test_a_checkpoint_with_an_old_two_leaf_position_restores_and_resumes_as_before(tmp_path):
    """A checkpoint written before positions recorded their batch restores bit-exact (the new
    leaf takes the template's 0: the reading stream's own global batch) and resumes as it did,
    without writing to it."""
    state = fx.TrainState.create(torch.nn.Linear(1, 1), fx.optim.sgd(0.1)).replace(
        step=torch.tensor(3), data=OldPosition(torch.tensor(0), torch.tensor(3)))
    with fx.checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(state, force=True)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    template = fx.TrainState.create(torch.nn.Linear(1, 1), fx.optim.sgd(0.1)).replace(
        data=fx.data.DataPosition.start())
    restored = fx.checkpoint.CheckpointManager(tmp_path).restore(like=template)
    assert fx.tree_digest(restored.replace(data=None)) == fx.tree_digest(state.replace(data=None))
    assert [int(x) for x in pytree.tree_leaves(restored.data)] == [0, 3, 0]
    with fx.checkpoint.CheckpointManager(tmp_path) as manager:
        _, rest, _ = fit(manager, 8, 5)
    assert torch.equal(torch.cat(rest), fx.data.Batches(IDS, 8, seed=1).order(0)[24:40])
    assert all(files[p] == p.read_bytes() for p in files)  # the old checkpoint: as it was


def test_fit_starts_an_epoch_with_no_batch_left_at_the_next_one_and_every_checkpoint_resumes(
        tmp_path):
    """8 examples: a step of 4 saved, then batches of 8 (drop_last), whose epoch 0 has nothing
    left: fit starts at epoch 1 (no batch of it counted in epoch 0, max_epochs not overshot),
    and the checkpoint it writes resumes again (its position once named example 8 of 8)."""
    ids = torch.arange(8)
    step = fx.make_train_step(lambda s, p, b: (s.apply(p, b.float()[:, None]) ** 2).mean())

    def fit(batch_size, **how):
        with fx.checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
            state = fx.TrainState.create(torch.nn.Linear(1, 1), fx.optim.sgd(0.01), seed=0)
            return fx.fit(state, step, fx.data.Batches(ids, batch_size, seed=1), progress=False,
                          checkpoint=manager, **how)

    assert [int(x) for x in pytree.tree_leaves(fit(4, max_steps=1).data)] == [0, 1, 4]
    end = fit(8, max_epochs=1)  # epoch 0 is over: nothing more to train
    assert int(end.step) == 1
    end = fit(8, max_steps=2)
    assert int(end.step) == 2 and [int(x) for x in pytree.tree_leaves(end.data)] == [2, 0, 8]
    end = fit(8, max_steps=3)  # failed before: "position index 1 in batches of 8 is 8 examples
    assert int(end.step) == 3  # into an epoch of this stream's 8"


@settings(max_examples=25, deadline=None)
@given(size=st.integers(8, 40), batch_size=st.integers(1, 4), world=st.integers(2, 4),
       steps=st.integers(0, 5), drop_last=st.booleans(), kind=st.sampled_from(["batches", "stream"]))
def test_one_stream_read_as_several_shares_is_each_shares_own_stream(size, batch_size, world, steps,
                                                                    drop_last, kind):
    """A stream holds no rank (issue 76): one ``Batches`` or ``Stream`` made without a
    ``shard``, read through ``fx.data.Shared`` as each rank of ``world`` in turn, call by call
    (as one stream feeding states of two layouts would be), gives every rank the batches and
    positions of a stream made for that rank alone; then, read as one process from the
    position they reached, what a one-process stream gives from there."""
    def make(shard=None):
        if kind == "batches":
            return fx.data.Batches(torch.arange(size), batch_size, seed=5, drop_last=drop_last,
                                   shard=shard)
        rows = [torch.tensor([i]) for i in range(size)]
        return fx.data.Stream(rows, batch_size, drop_last=drop_last, shard=shard,
                              collate=torch.cat)
    if drop_last and size < batch_size * world:  # no whole global batch: refused elsewhere
        return
    one = make()
    shares = [fx.data.Shared(one, (rank, world)) for rank in range(world)]
    alone = [make((rank, world)) for rank in range(world)]
    if len(alone[0]) <= steps:
        return
    position = one.init()
    for _ in range(steps):
        got = [share.next(position) for share in shares]  # interleaved on the one stream
        want = [stream.next(position) for stream in alone]
        for (b, p, d), (wb, wp, wd) in zip(got, want):
            assert torch.equal(b, wb) and d == wd
            assert pytree.tree_leaves(p) == pytree.tree_leaves(wp) or all(
                torch.equal(x, y) for x, y in zip(pytree.tree_leaves(p), pytree.tree_leaves(wp)))
        position = got[-1][1]  # the very position the stream made last, read as another share
    assert len(shares[0]) == len(alone[0])
    single = make(False)
    batch, after, done = one.next(position, (0, 1))
    want_batch, want_after, want_done = single.next(saved(position))
    assert torch.equal(batch, want_batch) and done == want_done
    assert [int(x) for x in pytree.tree_leaves(after)] == \
        [int(x) for x in pytree.tree_leaves(want_after)]


def test_fit_reads_a_stream_as_its_states_share_and_leaves_the_stream_as_it_was_made(
        monkeypatch):
    """``fit`` pairs its data with the share of the state's layout (``as_stream``): the stream
    itself where this process's share is the layout's (one process here), else
    ``fx.data.Shared`` with the layout's share (a layout of 2 data replicas, faked), which
    reads that rank's half; the stream keeps no rank of its own."""
    data = fx.data.Batches(torch.arange(12.0).reshape(6, 2), 2, shuffle=False)
    state = fx.TrainState.create(torch.nn.Linear(2, 1), fx.optim.sgd(0.1))
    assert fx.data.as_stream(data, state.layout) is data and fx.data.as_stream(data) is data
    assert not hasattr(data, "rank") and not hasattr(data, "world_size")
    monkeypatch.setattr("fxtrain.distributed.data_rank", lambda layout=None: 1)  # 2 replicas
    monkeypatch.setattr("fxtrain.distributed.data_world_size", lambda layout=None: 2)
    stream = fx.data.as_stream(data, state.layout)
    assert isinstance(stream, fx.data.Shared) and stream.stream is data and stream.share == (1, 2)
    batch, _, _ = stream.next(stream.init())
    assert batch.tolist() == [[4.0, 5.0], [6.0, 7.0]] and len(stream) == 1 and len(data) == 3
    mine = fx.data.Batches(torch.arange(12.0).reshape(6, 2), 2, shard=(0, 1))
    assert fx.data.as_stream(mine, state.layout) is mine  # its own shard: read as made
    with pytest.raises(ValueError, match=r"shard must be \(rank, world_size\)"):
        fx.data.Batches(torch.arange(4), 2, shard=(2, 2))
