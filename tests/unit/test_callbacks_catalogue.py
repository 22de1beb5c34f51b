"""The tensor and monitor callbacks of the catalogue, on the host and inside a compiled step."""

import logging

import pytest
import torch

import fxtrain as fx
from fxtrain.callbacks import fold
from helpers import TRACED, classification_batch, graph_count, mlp, xent


class Recorder:
    """A writer that keeps what it is given."""

    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, mapping):
        self.scalars.append((step, dict(mapping)))


def host_state(*cbs, tx=None):
    state = fx.TrainState.create(mlp(), tx or fx.optim.sgd(0.1))
    return fx.callbacks.init(cbs, state)


def evals(cb, values, state=None, monitor="loss"):
    """Folds ``cb`` over eval_end events with a scripted metric; returns states and stops."""
    state = state or host_state(cb)
    stops = []
    for i, v in enumerate(values, start=1):
        state, control = fold([cb], state, fx.Event("eval_end", i * 10, 0, {monitor: torch.tensor(v)}))
        stops.append(bool(control.stop))
    return state, stops


def test_early_stopping_stops_at_the_right_evaluation():
    cb = fx.callbacks.early_stopping("loss", patience=2, min_delta=0.05)
    _, stops = evals(cb, [1.0, 0.9, 0.88, 0.87, 0.5, 0.6, 0.7, 0.4])
    # 0.88 and 0.87 are not better than 0.9 by 0.05: the second of them stops.
    assert stops == [False, False, False, True, True, True, True, True]


def test_early_stopping_in_max_mode_and_nan_never_improves():
    cb = fx.callbacks.early_stopping("acc", patience=1, mode="max")
    state, stops = evals(cb, [0.5, 0.7, float("nan")], monitor="acc")
    assert stops == [False, False, True]
    es = state.callbacks["early_stopping"]
    assert float(es.best) == pytest.approx(0.7) and int(es.best_step) == 20


def test_restore_best_puts_back_the_best_params_bit_exactly():
    cb = fx.callbacks.early_stopping("loss", patience=1, restore_best=True)
    state = host_state(cb)
    snapshots = {}
    for i, loss in enumerate([3.0, 1.0, 2.0], start=1):
        state = state.replace(params={k: v + i for k, v in state.params.items()})
        snapshots[i] = {k: v.clone() for k, v in state.params.items()}
        state, control = fold([cb], state, fx.Event("eval_end", i, 0, {"loss": loss}))
    assert bool(control.stop)
    for k, v in state.params.items():  # the stop keeps the evaluated params (fit saves them,
        assert torch.equal(v, snapshots[3][k])  # with that evaluation's metrics)...
    moved = state.replace(params={k: v * 7 for k, v in state.params.items()})
    end, _ = fold([cb], moved, fx.Event("train_end", 4, 0, {"reason": "max_steps"}))
    assert all(torch.equal(end.params[k], snapshots[2][k]) for k in end.params)  # ...train_end
    # puts back the params of the best evaluation


def test_a_stopped_early_stopping_stops_again_at_train_begin():
    """A run resumed from a checkpoint saved after the stop ends at once (fit reads the stop
    that train_begin asks for before its first step)."""
    cb = fx.callbacks.early_stopping("loss", patience=1)
    state = host_state(cb)
    _, control = fold([cb], state, fx.Event("train_begin", 0, 0, {}))
    assert not bool(control.stop)
    state, stops = evals(cb, [1.0, 2.0], state)
    assert stops == [False, True]
    _, control = fold([cb], state, fx.Event("train_begin", 20, 0, {}))
    assert bool(control.stop)


def test_missing_monitor_names_the_available_metrics():
    cb = fx.callbacks.early_stopping("val_loss")
    with pytest.raises(KeyError, match=r"'val_loss' is not in the eval_end metrics; available: \['accuracy', 'loss'\]"):
        fold([cb], host_state(cb), fx.Event("eval_end", 1, 0, {"loss": 1.0, "accuracy": 0.5}))


def poisoned(batch):
    x, y = batch
    return x.clone().fill_(float("nan")), y


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_nan_guard_discards_the_poisoned_update(action):
    cb = fx.callbacks.nan_guard(action)
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    step = fx.make_train_step(xent, callbacks=[cb])
    batch = classification_batch()
    state, m = step(state, batch)
    before = state
    state, m = step(state, poisoned(batch))
    assert all(torch.equal(state.params[k], before.params[k]) for k in state.params)
    assert fx.tree_digest(state.opt_state) == fx.tree_digest(before.opt_state)
    assert int(state.step) == 2 and int(state.callbacks["nan_guard"].skipped) == 1
    assert bool(m["control/stop"]) == (action == "stop")
    state, m = step(state, batch)  # and training goes on from the clean state
    assert all(torch.isfinite(v).all() for v in state.params.values())
    assert not bool(state.callbacks["nan_guard"].flagged)


def test_nan_guard_max_skips_stops():
    cb = fx.callbacks.nan_guard("skip", max_skips=2)
    state = host_state(cb)
    stops = []
    for loss in [1.0, float("nan"), 1.0, float("inf")]:
        state, c = fold([cb], state, fx.Event("step_end", 1, 0, {"loss": torch.tensor(loss)}))
        stops.append(bool(c.stop))
    assert stops == [False, False, False, True]
    with pytest.raises(ValueError, match="max_skips needs action='skip'"):
        fx.callbacks.nan_guard("stop", max_skips=3)


def test_grad_monitor_on_the_host_warns_and_publishes(caplog):
    writer = Recorder()
    cb = fx.callbacks.grad_monitor(2, vanishing=1e-3, exploding=10.0, writer=writer)
    step = fx.make_train_step(xent, grad_stats=True)
    state = host_state(cb)
    state, metrics = step(state, classification_batch())
    metrics = {**metrics, "grad_norm/0.bias": torch.tensor(1e-6), "grad_norm/2.weight": torch.tensor(50.0)}
    with caplog.at_level(logging.WARNING, logger="fxtrain"):
        fold([cb], state, fx.Event("step_end", 1, 0, metrics))  # not due
        state, _ = fold([cb], state, fx.Event("step_end", 2, 0, metrics))
    assert "vanishing gradients" in caplog.text and "['0.bias']" in caplog.text
    assert "exploding gradients" in caplog.text and "['2.weight']" in caplog.text
    assert [s for s, _ in writer.scalars] == [2]
    assert writer.scalars[0][1]["grad_norm/2.weight"] == 50.0
    gm = state.callbacks["grad_monitor"]
    assert int(gm.vanishing) == 1 and int(gm.exploding) == 1


def test_grad_monitor_on_the_host_needs_grad_stats():
    cb = fx.callbacks.grad_monitor()
    state = host_state(cb)
    _, metrics = fx.make_train_step(xent)(state, classification_batch())
    with pytest.raises(KeyError, match="grad_stats=True"):
        fold([cb], state, fx.Event("step_end", 1, 0, metrics))


def test_ema_matches_the_formula_and_swaps_in():
    cb = fx.callbacks.ema(0.5)
    state = host_state(cb)
    start = {k: v.clone() for k, v in state.params.items()}
    state = state.replace(params={k: v + 2 for k, v in state.params.items()})
    state, _ = fold([cb], state, fx.Event("step_end", 1, 0, {}))
    avg = state.callbacks["ema"]
    assert all(torch.allclose(avg[k], start[k] + 1) for k in avg)
    swapped = fx.callbacks.with_ema_params(state)
    assert all(torch.equal(swapped.params[k], avg[k]) for k in avg)


def test_reduce_lr_on_plateau_matches_torch():
    tx = fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=1.0)
    cb = fx.callbacks.reduce_lr_on_plateau("loss", factor=0.5, patience=2, cooldown=1,
                                           min_delta=0.01, min_lr=0.05)
    state = host_state(cb, tx=tx)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1,
                                                     threshold=0.01, threshold_mode="abs",
                                                     min_lr=0.05)
    losses = [5, 4, 4, 4, 4, 4, 3.995, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    for i, loss in enumerate(losses):
        state, _ = fold([cb], state, fx.Event("eval_end", i, 0, {"loss": loss}))
        ref.step(loss)
        assert float(fx.optim.learning_rate(state.opt_state)) == pytest.approx(
            opt.param_groups[0]["lr"]), i
    assert opt.param_groups[0]["lr"] < 0.2  # the sequence did reduce, several times


def test_reduce_lr_on_plateau_needs_an_injected_learning_rate():
    with pytest.raises(KeyError, match="inject_hyperparams"):
        host_state(fx.callbacks.reduce_lr_on_plateau(), tx=fx.optim.adam(1e-3))


def test_monitors_publish_when_due():
    writer = Recorder()
    clock = iter([0.0, 1.0, 3.0])
    cbs = [fx.callbacks.lr_monitor(2, writer=writer),
           fx.callbacks.throughput(2, writer=writer, tokens_per_batch=100,
                                   time_fn=lambda: next(clock)),
           fx.callbacks.memory_monitor(4, writer=writer)]
    state = host_state(*cbs, tx=fx.optim.inject_hyperparams(fx.optim.adam)(learning_rate=0.01))
    state, _ = fold(cbs, state, fx.Event("train_begin", 0, 0, {"batch_size": 8}))
    for s in range(1, 5):
        state, _ = fold(cbs, state, fx.Event("step_end", s, 0, {"loss": torch.tensor(1.0)}))
    got = {}
    for step, scalars in writer.scalars:
        for k, v in scalars.items():
            got.setdefault(k, []).append((step, v))
    assert got["learning_rate"] == [(2, pytest.approx(0.01)), (4, pytest.approx(0.01))]
    assert got["hparams/learning_rate"][0][1] == pytest.approx(0.01)
    assert got["throughput/steps_per_sec"] == [(2, 2.0), (4, 1.0)]
    assert got["throughput/samples_per_sec"] == [(2, 16.0), (4, 8.0)]
    assert got["throughput/tokens_per_sec"] == [(2, 200.0), (4, 100.0)]
    assert got["memory/cpu_rss_mib"][0][0] == 4 and got["memory/cpu_rss_mib"][0][1] > 10


def test_timer_stops_at_the_budget_and_carries_over_a_resume():
    now = [100.0]
    cb = fx.callbacks.timer(10, time_fn=lambda: now[0])
    state = host_state(cb)
    state, c = fold([cb], state, fx.Event("train_begin", 0, 0, {}))
    now[0] = 106.0
    state, c = fold([cb], state, fx.Event("train_end", 3, 0, {}))
    assert state.callbacks["timer"] == {"elapsed": 6.0} and not c.stop
    cb2 = fx.callbacks.timer(10, time_fn=lambda: now[0])  # a new process resumes
    now[0] = 500.0
    state, c = fold([cb2], state, fx.Event("train_begin", 3, 0, {}))
    now[0] = 503.0
    state, c = fold([cb2], state, fx.Event("step_end", 4, 0, {}))
    assert not c.stop
    now[0] = 504.5
    state, c = fold([cb2], state, fx.Event("step_end", 5, 0, {}))
    assert c.stop and state.callbacks["timer"]["elapsed"] == pytest.approx(10.5)


@pytest.mark.slow
def test_tensor_callbacks_compile_into_one_graph_over_200_steps():
    cbs = [fx.callbacks.early_stopping("loss", patience=50, event="step_end", restore_best=True),
           fx.callbacks.nan_guard("skip"), fx.callbacks.grad_monitor(5), fx.callbacks.ema(0.9),
           fx.callbacks.every(7, fx.callbacks.reduce_lr_on_plateau("loss", event="step_end"))]
    tx = fx.optim.inject_hyperparams(fx.optim.adamw)(learning_rate=1e-2)
    state = fx.TrainState.create(mlp(dropout=0.1), tx, callbacks=cbs)
    step = torch.compile(fx.make_train_step(xent, callbacks=cbs), fullgraph=True, backend=TRACED)
    batch = classification_batch()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(200):
            state, metrics = step(state, batch)
    assert graph_count() == 1
    assert int(state.step) == 200 and "grad_norm/0.weight" in metrics
    eager = fx.TrainState.create(mlp(dropout=0.1), tx, callbacks=cbs)
    eager_step = fx.make_train_step(xent, callbacks=cbs)
    for _ in range(5):
        eager, _ = eager_step(eager, batch)
    assert int(eager.callbacks["grad_monitor"].vanishing) == 0


@pytest.mark.parametrize("tensor_step", [False, True], ids=["host", "in_step"])
def test_checkpoint_policy_asks_for_a_save_exactly_every_n_steps(tensor_step):
    policy = fx.callbacks.checkpoint_policy(every=3)
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1), callbacks=[policy])
    asked = []
    for step in range(1, 8):
        event = fx.Event("step_end", torch.tensor(step) if tensor_step else step, 0, {})
        state, control = fold([policy], state, event)
        asked.append(bool(control.save))
    assert [s for s, a in zip(range(1, 8), asked) if a] == [3, 6]


def test_publish_and_rank_zero_functions_do_nothing_off_rank_zero(monkeypatch, caplog):
    from fxtrain import distributed
    from fxtrain.callbacks.publish import publish

    written = []

    class Writer:
        def write_scalars(self, step, scalars):
            written.append((step, dict(scalars)))

    publish(Writer(), 1, {"a": 1.0}, what="test")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    publish(Writer(), 2, {"a": 2.0}, what="test")
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        publish(None, 3, {"a": 3.0}, what="test")
    assert written == [(1, {"a": 1.0})] and not caplog.records
    assert distributed.rank_zero(lambda: "ran")() is None
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.rank_zero(lambda: "ran")() == "ran"
