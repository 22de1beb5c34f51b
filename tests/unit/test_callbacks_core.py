"""The callback protocol: fold laws, controls, combinators, and where callbacks may run."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtrain as fx
from fxtrain.callbacks import Callback, every, every_secs, fold, lambda_callback, on, on_steps
from helpers import TRACED, classification_batch, graph_count, mlp, xent

# A toy "state" for fold laws: any pytree-like value works; here a tuple of ints (a history).
FLAG = st.booleans()


def appender(tag, stop=False, save=False):
    def cb(state, event):
        return state + (tag,), fx.Control(stop=stop, save=save)
    return cb


callbacks_st = st.lists(st.tuples(st.integers(0, 99), FLAG, FLAG).map(
    lambda t: appender(*t)), max_size=6)
EVENT = fx.Event("step_end", 3, 0, {"loss": 1.0})


@given(st.tuples(st.integers(0, 9)))
def test_fold_of_nothing_is_identity(state):
    assert fold([], state, EVENT) == (state, fx.Control())


@settings(max_examples=50, deadline=None)
@given(callbacks_st, callbacks_st)
def test_fold_is_associative_over_concatenation(a, b):
    whole_state, whole_control = fold(a + b, (), EVENT)
    mid, c1 = fold(a, (), EVENT)
    end, c2 = fold(b, mid, EVENT)
    assert whole_state == end
    assert whole_control == c1 | c2


@given(st.lists(st.tuples(FLAG, FLAG, FLAG, FLAG, FLAG), max_size=6))
def test_controls_merge_as_logical_or(rows):
    merged = fx.Control()
    for row in rows:
        merged = merged | fx.Control(*row)
    expected = [any(col) for col in zip(*rows)] if rows else [False] * 5
    assert [merged.stop, merged.save, merged.evaluate, merged.log, merged.skip] == expected


@given(callbacks_st)
def test_each_callback_sees_the_state_left_by_the_previous(cbs):
    state, _ = fold(cbs, (), EVENT)
    assert len(state) == len(cbs)  # each appended to what the one before returned


def test_tensor_controls_merge_with_bools():
    merged = fx.Control(stop=torch.tensor(True)) | fx.Control(stop=False, save=True)
    assert bool(merged.stop) and merged.save is True


def test_unknown_event_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown event kind 'step_start'"):
        fx.Event("step_start", 0, 0)
    with pytest.raises(ValueError, match="unknown event kinds"):
        Callback("x", None, lambda s, e: (s, fx.Control()), kinds=("batch_end",))


def test_wrong_return_shape_names_the_callback():
    def my_bad_callback(state, event):
        return state
    with pytest.raises(TypeError, match="my_bad_callback returned"):
        fold([my_bad_callback], (), EVENT)
    named = Callback("named_cb", None, lambda s, e: (s, True))
    with pytest.raises(TypeError, match="'named_cb' returned tuple"):
        fold([named], (), EVENT)


def test_an_observer_returning_none_changes_nothing():
    seen = []
    state, control = fold([lambda s, e: seen.append(e.step)], ("s",), EVENT)
    assert state == ("s",) and control == fx.Control() and seen == [3]


def counter(name="counter"):
    def fn(state, event):
        n = fx.callbacks.callback_state(state, name)
        return state.replace(callbacks={**state.callbacks, name: n + 1}), fx.Control()
    return Callback(name, lambda s: torch.zeros((), dtype=torch.int64), fn)


def test_duplicate_names_are_an_error_and_explicit_names_fix_it():
    with pytest.raises(ValueError, match="two callbacks are named 'counter'"):
        fx.TrainState.create(mlp(), fx.optim.sgd(0.1), callbacks=[counter(), counter()])
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1),
                                 callbacks=[counter(), counter("counter2")])
    assert set(state.callbacks) == {"counter", "counter2"}


def test_missing_callback_state_says_how_to_create_it():
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    with pytest.raises(KeyError, match="no callback state named 'counter'"):
        fold([counter()], state, EVENT)
    state = fx.callbacks.init([counter()], state)
    assert int(fold([counter()], state, EVENT)[0].callbacks["counter"]) == 1


def run_host(cb, steps, state=None):
    state = state or fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    for s in steps:
        state, _ = fold([cb], state, fx.Event("step_end", s, 0, {}))
    return state


def test_every_and_on_steps_on_the_host():
    assert int(run_host(every(3, counter()), range(1, 11)).callbacks["counter"]) == 3
    assert int(run_host(on_steps([2, 5, 99], counter()), range(1, 11)).callbacks["counter"]) == 2
    with pytest.raises(ValueError, match="positive int"):
        every(0, counter())


def test_every_secs_uses_the_injected_clock():
    now = [0.0]
    cb = every_secs(10, counter(), time_fn=lambda: now[0])
    state = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    for t in [0, 5, 9.9, 10, 12, 19.9, 20.5, 21]:
        now[0] = t
        state, _ = fold([cb], state, fx.Event("step_end", 1, 0, {}))
    assert int(state.callbacks["counter"]) == 2  # at 10 and at 20.5
    assert cb.host


def test_on_and_lambda_callback_filter_by_kind():
    seen = []
    cb = on("epoch_end", lambda s, e: seen.append(e.kind))
    lam = lambda_callback(on_train_end=lambda s, e: seen.append("end"))
    for kind in ["train_begin", "step_end", "epoch_end", "train_end"]:
        fold([cb, lam], (), fx.Event(kind, 0, 0))
    assert seen == ["epoch_end", "end"]
    with pytest.raises(ValueError, match="unknown hook 'on_batch_end'"):
        lambda_callback(on_batch_end=print)


def test_rank_zero_runs_without_a_process_group():
    assert int(run_host(fx.callbacks.rank_zero(counter()), [1, 2]).callbacks["counter"]) == 2


def test_every_inside_a_compiled_step_is_one_graph():
    cbs = [every(4, counter()), on_steps([3, 7], counter("at"))]
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-3), callbacks=cbs)
    step = torch.compile(fx.make_train_step(xent, callbacks=cbs), fullgraph=True, backend=TRACED)
    batch = classification_batch()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10):
            state, _ = step(state, batch)
    assert int(state.callbacks["counter"]) == 2 and int(state.callbacks["at"]) == 2
    assert graph_count() == 1


def test_host_callbacks_are_refused_inside_the_step():
    with pytest.raises(ValueError, match="'throughput' does IO.*fx.fit"):
        fx.make_train_step(xent, callbacks=[fx.callbacks.throughput()])
    with pytest.raises(ValueError, match="only step_end events"):
        fx.make_train_step(xent, callbacks=[fx.callbacks.early_stopping("loss")])


def test_a_plain_lambda_runs_inside_the_step():
    cb = lambda s, e: (s, fx.Control(stop=e.metrics["loss"] < 100.0))  # noqa: E731
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    state, metrics = fx.make_train_step(xent, callbacks=[cb])(state, classification_batch())
    assert bool(metrics["control/stop"]) and not bool(metrics["control/save"])


def test_fold_reports_requests_from_callbacks_that_decide_alike_on_every_rank():
    """Only a Callback with host=False asking outright (a Python True) counts: a plain function
    or a host callback may decide differently per rank, and a tensor flag needs a read."""
    from fxtrain.callbacks.core import fold_reporting

    def asking(**control):
        return lambda state, event: (state, fx.Control(**control))

    pure = Callback("pure", None, asking(save=True))
    host = Callback("host", None, asking(stop=True), host=True)
    tensor = Callback("tensor", None, asking(stop=torch.tensor(True)))
    skip = Callback("skip", None, asking(skip=True))
    for callbacks, alike in [([pure], True), ([asking(stop=True)], False), ([host], False),
                             ([tensor], False), ([skip], False), ([host, tensor, pure], True)]:
        state, control, reported = fold_reporting(callbacks, (), EVENT)
        assert reported is alike, callbacks
        assert (state, control) == fold(callbacks, (), EVENT)


def test_save_veto_reads_every_vetoing_callback_state_and_names_it():
    from fxtrain.callbacks.core import save_veto

    def vetoing(name):  # a Callback whose state is its flag, vetoing while it holds
        return Callback(name, None, lambda state, event: None,
                        save_veto=lambda flag: (flag, "too early"))

    callbacks = [vetoing("a"), Callback("b", None, lambda state, event: None)]
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    assert save_veto(callbacks, state) is None
    state = state.replace(callbacks={"a": torch.tensor(False), "b": 3})
    assert save_veto(callbacks, state) is None
    callbacks[1] = vetoing("b")
    state = state.replace(callbacks={"a": torch.tensor(False), "b": True})
    assert save_veto(callbacks, state) == "b flagged it as too early"
