"""fit skips Dynamo's guards on a compiled step only where its own check says the guarded call
would pick the same graph: same batch shapes and dtypes, a state whose structure is stable."""

import pytest
import torch
from helpers import classification_batch, mlp, xent

import fxtrain as fx
from fxtrain import unguarded


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls made with the guards skipped."""
    calls = []
    real = unguarded._set_stance

    def counting(stance):
        calls.append(stance is unguarded._SKIP_GUARDS)
        return real(stance)

    monkeypatch.setattr(unguarded, "_set_stance", counting)
    return calls


def _pure_run(step, batches, state):
    for batch in batches:
        state, _ = step(state, batch)
    return state


def test_fit_skips_guards_only_for_batches_like_the_first_and_equals_guarded_calls(fast_calls):
    """60 examples in batches of 16: every epoch ends with a batch of 12, which must go through
    the guards (a graph for 16 rows would read past its end)."""
    x, y = classification_batch(n=60, seed=2)
    data = fx.data.Batches((x, y), 16, shuffle=False, drop_last=False)
    make = lambda: fx.TrainState.create(mlp(dropout=0.1), fx.optim.adamw(1e-2))  # noqa: E731
    step = torch.compile(fx.make_train_step(xent, donate=False), fullgraph=True, backend="eager")
    end = fx.fit(make(), step, data, max_steps=12)
    fast = sum(calls for calls in fast_calls[::2])  # each fast call sets the stance twice
    assert fast == 12 - 1 - 3  # all but the first call and the three short batches
    batches = [b for _ in range(3) for b in data]
    assert fx.tree_digest(end.replace(data=None)) == fx.tree_digest(_pure_run(step, batches, make()))


def test_an_eager_step_or_a_structure_change_keeps_the_guards(fast_calls):
    data = fx.data.Batches(classification_batch(n=64), 16)
    fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)), fx.make_train_step(xent), data,
           max_steps=4)
    assert fast_calls == []  # not compiled: nothing to skip

    def grows(state, batch):  # returns a state of another structure than it was given
        new, metrics = fx.make_train_step(xent)(state, batch)
        return new.replace(callbacks={"extra": torch.zeros(())}), metrics

    call = unguarded.Unguarded(torch.compile(grows, backend="eager"))
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    for batch in list(data)[:3]:
        state, _ = call(state, batch)
    assert fast_calls == []
