"""fit skips Dynamo's guards on a compiled step only where its own check says the guarded call
would pick the same graph: same batch shapes and dtypes, a state whose structure is stable."""

import pytest
import torch
from helpers import classification_batch, mlp, xent

import fxtrain as fx
from fxtrain.step import _unguarded as unguarded
from fxtrain._torch import stance


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls made with the guards skipped."""
    calls = []
    real = stance._set_stance

    def counting(to):
        calls.append(to is stance._SKIP_GUARDS)
        return real(to)

    monkeypatch.setattr(stance, "_set_stance", counting)
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


def test_a_batch_of_another_structure_takes_the_guarded_path_and_is_named(fast_calls):
    """Same leaves (shapes, dtypes) in another structure: the fast path compared leaves only and
    met Dynamo's 'Recompilation triggered with skip_guard_eval_unsafe stance'; now it is the
    guarded path's message."""
    x, y = classification_batch(n=48, seed=2)

    def loss(state, params, batch):
        batch = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return xent(state, params, batch)

    step = torch.compile(fx.make_train_step(loss), fullgraph=True, backend="eager")
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), {"x": x[32:], "y": y[32:]}]
    with pytest.raises(ValueError, match="this batch differs from the first one in structure"):
        fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)), step, batches, max_epochs=1)
    assert sum(fast_calls[::2]) == 1  # the second batch only


def test_the_batch_signature_tells_apart_what_the_guards_would():
    """The signature decides when the guards may be skipped: it must differ wherever Dynamo's
    guards on the batch would (structure, key order, shapes, dtypes, devices), fast path or not."""
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    sig = unguarded._signature
    same = [((x, y), (x.clone(), y.clone())), ([x, y], [x + 1, y]),
            ({"x": x, "y": y}, {"x": x.clone(), "y": y.clone()}),
            ({"x": x, "n": 3}, {"x": x.clone(), "n": 3})]  # a non-tensor leaf: torch's pytree
    for a, b in same:
        assert sig(a) == sig(b)
    different = [(x, y), [x, y], {"x": x, "y": y}, {"y": y, "x": x}, (x[:2], y[:2]),
                 (x.double(), y), (x.to("meta"), y), (x, y, None), {"x": x, "n": 3},
                 {"x": x, "n": 4}, (torch.nn.Parameter(x), y)]
    signatures = [sig(b) for b in different]
    for i, a in enumerate(signatures):
        for b in signatures[i + 1:]:
            assert a != b
