"""early_stopping's rules: the two min_delta modes, baseline and check_finite, each against the
library whose rule it names (transformers and Lightning, run here on the same sequences), inside a
compiled step and through a checkpoint."""

import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxtrain as fx
from fxtrain.callbacks import fold
from helpers import TRACED, extra, graph_count, mlp

# min_delta 0.05, patience 3, an evaluation every 10 steps (the docstring's sequence)
LOSSES = [1.00, 0.97, 0.94, 0.91, 0.88, 0.89, 0.90, 0.91]


def stops(cb, values, event="eval_end"):
    """The steps (10, 20, ...) at which ``cb`` asks to stop, folding one event per value."""
    state = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    asked = []
    for i, v in enumerate(values, start=1):
        ev = fx.Event(event, 10 * i, 0, {"loss": torch.tensor(v, dtype=torch.float64)})
        state, control = fold([cb], state, ev)
        if bool(control.stop):
            asked.append(10 * i)
    return asked, state


def first(asked):
    return asked[0] if asked else None


def test_keras_mode_moves_the_best_only_on_a_real_improvement():
    asked, state = stops(fx.callbacks.early_stopping(patience=3, min_delta=0.05), LOSSES)
    # best 1.00 (step 10), 0.94 (step 30: beats 1.00 by 0.06), 0.88 (step 50); then 3 waits
    assert first(asked) == 80
    es = state.callbacks["early_stopping"]
    assert float(es.best) == 0.88 and int(es.best_step) == 50


def test_transformers_mode_follows_every_strict_improvement():
    cb = fx.callbacks.early_stopping(patience=3, min_delta=0.05, min_delta_mode="transformers")
    asked, state = stops(cb, LOSSES)
    # 0.97, 0.94, 0.91 each beat the previous best, by 0.03 only: three waits
    assert first(asked) == 40
    es = state.callbacks["early_stopping"]
    assert float(es.best) == 0.91 and int(es.best_step) == 40


def test_the_modes_agree_without_a_min_delta():
    values = [1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.87]
    keras = stops(fx.callbacks.early_stopping(patience=2), values)[0]
    hf = stops(fx.callbacks.early_stopping(patience=2, min_delta_mode="transformers"), values)[0]
    assert first(keras) == first(hf) == 60


def hf_first_stop(values, patience, threshold, greater):
    """Runs transformers' own EarlyStoppingCallback and Trainer._determine_best_metric (the
    Trainer updates state.best_metric after the callbacks' on_evaluate)."""
    transformers = extra("transformers")
    from transformers.trainer_callback import TrainerControl, TrainerState

    cb = transformers.EarlyStoppingCallback(patience, threshold)
    args = types.SimpleNamespace(metric_for_best_model="loss", greater_is_better=greater,
                                 save_strategy="no")
    trainer = types.SimpleNamespace(args=args, state=TrainerState())
    control = TrainerControl()
    for i, v in enumerate(values, start=1):
        cb.on_evaluate(args, trainer.state, control, metrics={"eval_loss": v})
        transformers.Trainer._determine_best_metric(trainer, {"eval_loss": v}, None)
        if control.should_training_stop:
            return 10 * i
    return None


def test_hf_parity_on_the_docstring_sequence():
    assert hf_first_stop(LOSSES, 3, 0.05, greater=False) == 40


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]),
                       min_size=1, max_size=12),
       patience=st.integers(1, 4),
       threshold=st.sampled_from([0.0, 0.05, 0.1, 0.15, 0.25, 0.5]),
       greater=st.booleans())
def test_transformers_mode_stops_where_transformers_does(values, patience, threshold, greater):
    cb = fx.callbacks.early_stopping(patience=patience, min_delta=threshold,
                                     mode="max" if greater else "min",
                                     min_delta_mode="transformers")
    assert first(stops(cb, values)[0]) == hf_first_stop(values, patience, threshold, greater)


@pytest.mark.parametrize("values, threshold, expected", [
    ([1.0, 0.95], 0.05, None),  # |0.95 - 1.0| = 0.050000000000000044 > 0.05: an improvement
    ([1.0, 0.75], 0.25, 20),    # exactly 0.25 apart: not more than the threshold
])
def test_transformers_mode_rounds_at_the_edge_as_transformers_does(values, threshold, expected):
    cb = fx.callbacks.early_stopping(patience=1, min_delta=threshold,
                                     min_delta_mode="transformers")
    assert hf_first_stop(values, 1, threshold, greater=False) == expected
    assert first(stops(cb, values)[0]) == expected


def lightning_first_stop(values, patience, min_delta, mode, check_finite):
    """Lightning's own EarlyStopping rule (``_evaluate_stopping_criteria``) on the values."""
    pl = extra("pytorch_lightning")
    cb = pl.callbacks.EarlyStopping("loss", min_delta=min_delta, patience=patience, mode=mode,
                                    check_finite=check_finite)
    for i, v in enumerate(values, start=1):
        should_stop, _ = cb._evaluate_stopping_criteria(torch.tensor(v, dtype=torch.float64))
        if should_stop:
            return 10 * i
    return None


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
                                        float("nan"), float("inf"), float("-inf")]),
                       min_size=1, max_size=12),
       patience=st.integers(1, 4), min_delta=st.sampled_from([0.0, 0.05, 0.1, 0.15]),
       mode=st.sampled_from(["min", "max"]), check_finite=st.booleans())
def test_keras_mode_and_check_finite_stop_where_lightning_does(values, patience, min_delta, mode,
                                                               check_finite):
    cb = fx.callbacks.early_stopping(patience=patience, min_delta=min_delta, mode=mode,
                                     check_finite=check_finite)
    assert first(stops(cb, values)[0]) == lightning_first_stop(values, patience, min_delta,
                                                               mode, check_finite)


@pytest.mark.parametrize("values, min_delta, expected", [
    ([0.2, 0.15], 0.05, 20),  # 0.15 + 0.05 == 0.2: no improvement (0.2 - 0.05 would say one)
    ([1.0, 0.95], 0.05, 20),  # 0.95 + 0.05 == 1.0: none either (transformers says one)
])
def test_keras_mode_rounds_at_the_edge_as_lightning_does(values, min_delta, expected):
    cb = fx.callbacks.early_stopping(patience=1, min_delta=min_delta)
    assert lightning_first_stop(values, 1, min_delta, "min", False) == expected
    assert first(stops(cb, values)[0]) == expected


def test_check_finite_stops_at_once_and_keeps_the_best():
    values = [1.0, 0.9, float("nan"), 0.1]
    plain = stops(fx.callbacks.early_stopping(patience=3), values)[0]
    asked, state = stops(fx.callbacks.early_stopping(patience=3, check_finite=True), values)
    assert first(plain) is None and first(asked) == 30
    es = state.callbacks["early_stopping"]
    assert float(es.best) == 0.9 and int(es.wait) == 0 and bool(es.stopped)
    # +inf in max mode is "better" than any best; check_finite refuses it too
    asked, state = stops(fx.callbacks.early_stopping(mode="max", check_finite=True),
                         [0.5, float("inf")])
    assert asked == [20] and float(state.callbacks["early_stopping"].best) == 0.5


def test_check_finite_inside_a_step_skips_the_non_finite_update():
    cb = fx.callbacks.early_stopping(patience=3, check_finite=True, event="step_end")
    state = fx.TrainState.create(torch.nn.Linear(1, 1), fx.optim.sgd(0.1), callbacks=[cb])
    step = fx.make_train_step(loss_fn, callbacks=[cb])
    state, _ = step(state, torch.ones(4, 1))
    before = {k: v.clone() for k, v in state.params.items()}
    state, metrics = step(state, torch.full((4, 1), float("nan")))
    assert bool(metrics["control/stop"]) and bool(state.callbacks["early_stopping"].stopped)
    assert all(torch.equal(state.params[k], before[k]) for k in before)


def test_baseline_stops_a_run_that_never_beats_it_within_patience():
    # improving every evaluation, but never below the baseline 0.8: three events, then stop
    assert first(stops(fx.callbacks.early_stopping(patience=3, baseline=0.8), LOSSES)[0]) == 30
    # below the baseline at the third evaluation: the patience resets there
    beats = [1.0, 0.9, 0.7, 0.75, 0.72, 0.71, 0.71]
    assert first(stops(fx.callbacks.early_stopping(patience=3, baseline=0.8), beats)[0]) == 60
    # the baseline needs min_delta too (Keras's rule): 0.79 does not beat 0.8 by 0.05
    cb = fx.callbacks.early_stopping(patience=2, baseline=0.8, min_delta=0.05)
    asked, state = stops(cb, [0.79, 0.7])
    assert first(asked) is None and int(state.callbacks["early_stopping"].wait) == 0
    asked, state = stops(cb, [0.79, 0.78])
    assert first(asked) == 20
    # in max mode the baseline is a floor to rise above
    up = fx.callbacks.early_stopping(patience=3, mode="max", baseline=0.5)
    assert first(stops(up, [0.3, 0.4, 0.6, 0.55, 0.58, 0.59])[0]) == 60
    assert first(stops(up, [0.3, 0.4, 0.45])[0]) == 30


def keras_first_stop(values, patience, baseline, monkeypatch):
    """Keras's own EarlyStopping(baseline=...) on the values, one epoch per value."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # not TensorFlow, which runs in subprocesses
    keras = extra("keras")
    cb = keras.callbacks.EarlyStopping(monitor="loss", patience=patience, mode="min",
                                       baseline=baseline)
    model = types.SimpleNamespace(stop_training=False)
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, v in enumerate(values):
        cb.on_epoch_end(epoch, {"loss": v})
        if model.stop_training:
            return 10 * (epoch + 1)
    return None


@pytest.mark.parametrize("values, expected, keras_differs", [
    ([1.0, 1.1, 1.2], 20, False),           # above the baseline and never better
    ([0.7, 0.75, 0.72, 0.71], 30, False),   # below it at once, then no better
    ([1.0, 0.9, 0.85, 0.9, 0.95], 20, True),  # better each time, above it: Keras runs on
])
def test_baseline_against_keras(values, expected, keras_differs, monkeypatch):
    """Keras checks the patience only on an epoch that does not improve the best (as the
    docstring says); where that matters it stops later than this callback."""
    ours = first(stops(fx.callbacks.early_stopping(patience=2, baseline=0.8), values)[0])
    theirs = keras_first_stop(values, 2, 0.8, monkeypatch)
    assert ours == expected
    assert (theirs != ours) == keras_differs
    if keras_differs:
        assert theirs == 40  # 0.9 does not improve on 0.85: the patience is checked there


@pytest.mark.parametrize("kwargs, match", [
    ({"min_delta_mode": "hf"}, "min_delta_mode must be one of"),
    ({"baseline": float("nan")}, "baseline must be a finite number"),
    ({"min_delta": -0.1}, "patience and min_delta must be >= 0")])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fx.callbacks.early_stopping(**kwargs)


def loss_fn(state, params, batch):
    return state.apply(params, batch).pow(2).mean()


def test_inside_a_compiled_step_one_graph_and_equal_to_the_host():
    """A scripted loss (the batch scales it), through the new modes, baseline and check_finite,
    compiled into one graph; the same decisions as the same callback folded on the host."""
    cbs = [fx.callbacks.early_stopping(patience=3, min_delta=0.05, event="step_end",
                                       min_delta_mode="transformers", name="hf"),
           fx.callbacks.early_stopping(patience=3, baseline=0.2, check_finite=True,
                                       event="step_end", name="lightning")]
    state = fx.TrainState.create(torch.nn.Linear(1, 1, bias=False), fx.optim.sgd(0.0),
                                 callbacks=cbs)
    state = state.replace(params={"weight": torch.ones(1, 1)})
    step = torch.compile(fx.make_train_step(loss_fn, callbacks=cbs), fullgraph=True,
                         backend=TRACED)
    host = fx.callbacks.init(cbs, fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    scripted = [1.0, 0.97, 0.94, 0.91, 0.5, 0.4]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, loss in enumerate(scripted, start=1):
            state, metrics = step(state, torch.tensor([[loss ** 0.5]]))
            host, _ = fold(cbs, host, fx.Event("step_end", i, 0, {"loss": metrics["loss"]}))
    assert graph_count() == 1
    for name in ("hf", "lightning"):
        a, b = state.callbacks[name], host.callbacks[name]
        assert [int(a.wait), bool(a.stopped), int(a.best_step)] == \
               [int(b.wait), bool(b.stopped), int(b.best_step)], name
    assert bool(state.callbacks["hf"].stopped) and int(state.callbacks["hf"].best_step) == 4
    assert bool(state.callbacks["lightning"].stopped)  # 3 steps above the baseline 0.2


def test_the_state_goes_through_a_checkpoint_and_decides_the_same(tmp_path):
    cb = fx.callbacks.early_stopping(patience=3, min_delta=0.05, min_delta_mode="transformers",
                                     baseline=0.99, check_finite=True)
    _, state = stops(cb, LOSSES[:2])
    fx.checkpoint.save(tmp_path / "ckpt", state)
    like = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    restored = fx.checkpoint.restore(tmp_path / "ckpt", like=like)
    assert fx.tree_digest(restored) == fx.tree_digest(state)
    for s in (state, restored):
        asked = []
        for i, v in enumerate(LOSSES[2:], start=3):
            s, control = fold([cb], s, fx.Event("eval_end", 10 * i, 0, {"loss": v}))
            asked.append(bool(control.stop))
        # none beats the baseline 0.99 by 0.05: the third evaluation (step 30) stops
        assert asked.index(True) == 0
