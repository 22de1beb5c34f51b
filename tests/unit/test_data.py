import pytest
import torch

import fxtrain as fx
from helpers import classification_batch, graph_count, mlp, xent


def _collect(data, position, n):
    out = []
    for _ in range(n):
        batch, position, _ = data.next(position)
        out.append(batch)
    return out, position


def test_an_epoch_visits_every_example_once():
    x = torch.arange(10)
    data = fx.data.Batches(x, batch_size=3, drop_last=False, seed=1)
    assert len(data) == 4
    batches, position = _collect(data, data.init(), 4)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert int(position.epoch) == 1 and int(position.index) == 0


def test_drop_last_keeps_shapes_static_and_flags_epoch_end():
    data = fx.data.Batches({"x": torch.randn(10, 2), "y": torch.arange(10)}, batch_size=3)
    assert len(data) == 3
    position, ends = data.init(), []
    for _ in range(6):
        batch, position, done = data.next(position)
        assert batch["x"].shape == (3, 2) and batch["y"].shape == (3,)
        ends.append(done)
    assert ends == [False, False, True] * 2


def test_shuffle_is_a_function_of_seed_and_epoch():
    a = fx.data.Batches(torch.arange(50), 50, seed=3)
    b = fx.data.Batches(torch.arange(50), 50, seed=3)
    assert torch.equal(a.order(0), b.order(0)) and not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), fx.data.Batches(torch.arange(50), 50, seed=4).order(0))
    assert torch.equal(fx.data.Batches(torch.arange(5), 5, shuffle=False).order(7), torch.arange(5))


def test_resume_from_a_saved_position_continues_exactly():
    x, y = torch.randn(23, 4), torch.arange(23)
    data = fx.data.Batches((x, y), batch_size=4, seed=9)
    uninterrupted, _ = _collect(data, data.init(), 13)
    first, position = _collect(data, data.init(), 6)
    saved = fx.data.DataPosition(position.epoch.clone(), position.index.clone())
    resumed = fx.data.Batches((x, y), batch_size=4, seed=9)  # a new process
    rest, _ = _collect(resumed, saved, 7)
    for a, b in zip(uninterrupted, first + rest):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_map_style_dataset_with_collate():
    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i)]), "y": i * i}

    data = fx.data.Batches(Squares(), batch_size=2, shuffle=False)
    batch, _, _ = data.next(data.init())
    assert torch.equal(batch["x"], torch.tensor([[0.0], [1.0]])) and batch["y"].tolist() == [0, 1]
    assert len(list(iter(data))) == 3


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same first dimension"):
        fx.data.Batches((torch.zeros(4, 2), torch.zeros(5)), 2)
    with pytest.raises(ValueError, match="make no batch"):
        fx.data.Batches(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="batch_size"):
        fx.data.Batches(torch.zeros(3), 0)
    with pytest.raises(TypeError, match="map-style dataset"):
        fx.data.Batches(iter([1, 2]), 1)
    data = fx.data.Batches(torch.zeros(8), 2)
    with pytest.raises(TypeError, match="DataPosition"):
        data.next(None)
    with pytest.raises(ValueError, match="outside"):
        data.next(fx.data.DataPosition(torch.tensor(0), torch.tensor(9)))


def test_position_in_the_state_does_not_recompile_the_step():
    x, y = classification_batch(n=64)
    data = fx.data.Batches((x, y), batch_size=16, seed=0)
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1)).replace(data=data.init())
    step = torch.compile(fx.make_train_step(xent), fullgraph=True, backend="eager")
    batch, position, _ = data.next(state.data)
    state, _ = step(state.replace(data=position), batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(9):
            batch, position, _ = data.next(state.data)
            state, _ = step(state.replace(data=position), batch)
    assert graph_count() == 1 and int(state.data.epoch) == 2 and int(state.data.index) == 2


def test_a_list_of_example_tensors_is_batched_by_example():
    images = [torch.full((3, 4, 4), float(i)) for i in range(6)]  # first dim 3 is not a batch dim
    data = fx.data.Batches(images, batch_size=2, shuffle=False)
    batch, _, _ = data.next(data.init())
    assert batch.shape == (2, 3, 4, 4) and batch[1].max() == 1.0


def test_positions_from_any_epoch_in_any_order():
    data = fx.data.Batches(torch.arange(12), batch_size=4, seed=2)
    fresh = lambda e, i: fx.data.Batches(torch.arange(12), 4, seed=2).next(  # noqa: E731
        fx.data.DataPosition(torch.tensor(e), torch.tensor(i)))[0]
    for e, i in [(3, 1), (0, 2), (3, 0), (1, 2), (0, 0)]:
        got, _, _ = data.next(fx.data.DataPosition(torch.tensor(e), torch.tensor(i)))
        assert torch.equal(got, fresh(e, i))
        assert torch.equal(got, data.order(e)[4 * i:4 * i + 4])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
def test_k_batches_taken_at_once_are_the_k_batches_taken_one_by_one(shuffle, drop_last):
    """Batches.next_stacked (what fit takes for steps_per_call=k) gives what k calls of next
    give, stacked, with the same positions; None where it cannot (a short batch, an epoch that
    ends before the k-th), and fit then takes them one by one."""
    data = {"x": torch.arange(46.0).reshape(23, 2), "y": torch.arange(23)}
    for k in (1, 2, 3, 4):
        stream = fx.data.Batches(data, 3, shuffle=shuffle, seed=5, drop_last=drop_last)
        single = fx.data.Batches(data, 3, shuffle=shuffle, seed=5, drop_last=drop_last)
        at, one = stream.init(), single.init()
        for _ in range(3 * len(stream)):
            got = stream.next_stacked(at, k)
            batches = []
            for i in range(k):
                batch, one, done = single.next(one)
                batches.append(batch)
                if done and i < k - 1:
                    break
            whole = len(batches) == k and all(len(b["y"]) == 3 for b in batches)
            if not whole:
                assert got is None and done  # only an epoch's end stops a whole take
                at = stream.skip_epoch(at)  # where one by one ended: the next epoch
                continue
            assert got is not None
            stacked, at, ended = got
            for key in data:
                assert torch.equal(stacked[key], torch.stack([b[key] for b in batches]))
            assert (int(at.epoch), int(at.index), ended) == (int(one.epoch), int(one.index), done)
