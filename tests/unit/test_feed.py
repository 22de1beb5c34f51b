"""Batches onto the device: ``fx.to_device`` and fit's one-call-ahead feed.

The feed takes batches ahead only on CUDA; here it is forced on for the CPU, which runs the
same bookkeeping (positions, errors, stops) without the side stream.
"""

import pytest
import torch

import fxtrain as fx
from fxtrain.data._feed import Feed
from helpers import mlp, xent

X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


class Counting(fx.data.Batches):
    """Batches that count the batches taken."""

    taken = 0

    def next(self, position):
        self.taken += 1
        return super().next(position)

    def next_stacked(self, position, k):
        got = super().next_stacked(position, k)
        self.taken += 0 if got is None else k  # else next counts them, one by one
        return got


def train(ahead, monkeypatch, data=None, steps_per_call=1, **kwargs):
    monkeypatch.setattr("fxtrain.loop._fit.prefetches", lambda device: ahead)
    state = fx.TrainState.create(mlp((8, 16, 2), dropout=0.1), fx.optim.adamw(1e-2))
    step = fx.make_train_step(xent, steps_per_call=steps_per_call)
    data = Counting((X, Y), 16) if data is None else data
    return fx.fit(state, step, data, **kwargs), data


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_taking_ahead_trains_the_same_bits_and_takes_nothing_past_the_limit(monkeypatch,
                                                                           steps_per_call):
    plain, data_plain = train(False, monkeypatch, max_steps=8, steps_per_call=steps_per_call)
    ahead, data_ahead = train(True, monkeypatch, max_steps=8, steps_per_call=steps_per_call)
    for a, b in zip(torch.utils._pytree.tree_leaves(plain.params), torch.utils._pytree.tree_leaves(ahead.params)):
        assert torch.equal(a, b)
    assert (int(ahead.data.epoch), int(ahead.data.index)) == (1, 2)  # the batches it used
    assert (int(plain.data.epoch), int(plain.data.index)) == (1, 2)
    assert data_plain.taken == data_ahead.taken == 8  # none taken beyond max_steps


def test_a_batch_taken_ahead_for_another_position_is_taken_again():
    data = Counting((X, Y), 16, shuffle=False)
    feed = Feed(data.next, torch.device("cpu"), ahead=True)
    start = data.init()
    batch, after, _ = feed.take(start)
    feed.prefetch(after)
    again, _, _ = feed.take(start)  # the loop went back (a restore): not the batch taken ahead
    assert torch.equal(again[0], batch[0]) and data.taken == 3
    feed.prefetch(after)
    second, _, _ = feed.take(after)
    assert torch.equal(second[0], X[16:32]) and data.taken == 4


def test_an_error_met_ahead_is_raised_by_the_take_that_asks_for_it():
    def take(position):
        if position == 1:
            raise ValueError("bad batch 1")
        return position, position + 1, False

    feed = Feed(take, torch.device("cpu"), ahead=True)
    assert feed.take(0) == (0, 1, False)
    feed.prefetch(1)  # no error yet
    with pytest.raises(ValueError, match="bad batch 1"):
        feed.take(1)


def test_data_running_out_and_stops_end_the_run_as_without_taking_ahead(monkeypatch):
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 96, 16)]
    plain, _ = train(False, monkeypatch, data=iter(batches))
    ahead, _ = train(True, monkeypatch, data=iter(batches))
    assert int(plain.step) == int(ahead.step) == 6
    for a, b in zip(torch.utils._pytree.tree_leaves(plain.params), torch.utils._pytree.tree_leaves(ahead.params)):
        assert torch.equal(a, b)

    def stop_at_3(state, event):
        if event.kind == "step_end" and event.step == 3:
            return state, fx.Control(stop=True)
        return state, fx.Control()

    stopped, data = train(True, monkeypatch, callbacks=[stop_at_3], max_epochs=3)
    assert int(stopped.step) == 3 and (int(stopped.data.epoch), int(stopped.data.index)) == (0, 3)
    assert data.taken == 4  # one call taken ahead, unused: the position says where to resume


def test_to_device_leaves_what_is_there_and_pins_only_for_a_gpu():
    batch = {"x": X[:4], "name": "a"}
    assert fx.to_device(batch, "cpu") is batch
    assert fx.to_device(batch, "cpu", pin=True) is batch
    moved = fx.to_device(batch, "meta", pin=True)  # meta stands in for another device
    assert moved["x"].device.type == "meta" and moved["name"] == "a"
    assert not batch["x"].is_pinned()


def test_batches_come_out_on_the_device_asked_for_with_the_position_on_the_cpu():
    on_cpu = fx.data.Batches((X, Y), 16, seed=3)
    there = fx.data.Batches((X, Y), 16, seed=3, device="meta")  # meta stands in for a GPU
    a, position_a, _ = on_cpu.next(on_cpu.init())
    b, position_b, _ = there.next(there.init())
    assert a[0].device.type == "cpu" and b[0].device.type == b[1].device.type == "meta"
    assert b[0].shape == a[0].shape and position_b.index.device.type == "cpu"
    examples = [(X[i], Y[i]) for i in range(96)]  # a dataset: copied batch by batch
    batch = next(iter(fx.data.Batches(examples, 16, device="meta")))
    assert batch[0].device.type == "meta" and batch[0].shape == (16, 8)


@pytest.mark.hardware
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_batches_copied_ahead_on_a_side_stream_train_the_same_bits(monkeypatch):
    def run(ahead):
        monkeypatch.setattr("fxtrain.loop._fit.prefetches", lambda device: ahead)
        state = fx.TrainState.create(mlp((8, 16, 2), dropout=0.1).cuda(), fx.optim.adamw(1e-2))
        step = torch.compile(fx.make_train_step(xent), fullgraph=True)
        return fx.fit(state, step, fx.data.Batches((X, Y), 16), max_steps=12)

    plain, ahead = run(False), run(True)
    for a, b in zip(torch.utils._pytree.tree_leaves(plain.params),
                    torch.utils._pytree.tree_leaves(ahead.params)):
        assert a.device.type == "cuda" and torch.equal(a, b)


def test_to_device_moves_tensors_inside_any_pytree_node_and_subclasses():
    """Plain containers of plain tensors take a fast check; a node only torch's pytree knows (an
    fxtrain dataclass) and a tensor subclass take the full walk, and still move."""
    from fxtrain import struct

    @struct.dataclass
    class Pair:
        x: torch.Tensor
        y: torch.Tensor

    pair = Pair(X[:4], Y[:4])
    assert fx.to_device(pair, "cpu") is pair
    moved = fx.to_device({"pair": pair, "w": torch.nn.Parameter(X[:2])}, "meta")
    assert moved["pair"].x.device.type == moved["pair"].y.device.type == "meta"
    assert moved["w"].device.type == "meta"
    assert fx.to_device([X[:4], (Y[:4],)], "meta")[1][0].device.type == "meta"
