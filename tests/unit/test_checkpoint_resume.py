"""Resuming through fit: every stateful callback's state survives a checkpoint and carries on."""

import pytest
import torch

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from helpers import mlp, xent

X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + X[:, 1] > 0).long()


def data():
    return fx.data.Batches((X, Y), 16, shuffle=True, seed=3)


eval_step = fx.make_eval_step(xent)


def run(in_step, host, steps, manager=None, *, resume=True, eval_every=4, tx=None):
    """A fresh process's view: new model, new state, new step function."""
    tx = tx or fx.optim.inject_hyperparams(fx.optim.adamw)(learning_rate=1e-2)
    state = fx.TrainState.create(mlp((8, 16, 2), dropout=0.2), tx, callbacks=in_step)
    step = fx.make_train_step(xent, callbacks=in_step)
    return fx.fit(state, step, data(), callbacks=host, max_steps=steps, checkpoint=manager,
                  eval_step=eval_step, eval_data=[(X[:48], Y[:48])], eval_every=eval_every,
                  resume=resume)


IN_STEP = {
    "early_stopping(step_end)": lambda: [fx.callbacks.early_stopping(
        "loss", patience=100, event="step_end", restore_best=True)],
    "nan_guard": lambda: [fx.callbacks.nan_guard("skip")],
    "grad_monitor": lambda: [fx.callbacks.grad_monitor(3)],
    "ema": lambda: [fx.callbacks.ema(0.9)],
    "reduce_lr_on_plateau(step_end)": lambda: [fx.callbacks.every(
        5, fx.callbacks.reduce_lr_on_plateau("loss", patience=1, event="step_end"))],
}
HOST = {
    "early_stopping": lambda: [fx.callbacks.early_stopping("loss", patience=100,
                                                           restore_best=True)],
    "reduce_lr_on_plateau": lambda: [fx.callbacks.reduce_lr_on_plateau("loss", patience=1)],
    "checkpoint policy": lambda: [fx.callbacks.checkpoint_policy(monitor="loss")],
    "ema on the host": lambda: [fx.callbacks.ema(0.9)],
}


@pytest.mark.parametrize("where,name", [("step", n) for n in IN_STEP] + [("host", n) for n in HOST])
def test_each_stateful_callback_survives_a_resume(tmp_path, where, name):
    make = IN_STEP[name] if where == "step" else HOST[name]
    cbs = lambda: (make(), []) if where == "step" else ([], make())  # noqa: E731
    whole = run(*cbs(), 20)
    with CheckpointManager(tmp_path) as m:
        first = run(*cbs(), 10, m)
        assert m.latest_step() == 10
    saved_state = first.callbacks
    with CheckpointManager(tmp_path) as m:
        restored = m.restore(like=fx.TrainState.create(
            mlp((8, 16, 2), dropout=0.2), fx.optim.inject_hyperparams(fx.optim.adamw)(
                learning_rate=1e-2), callbacks=cbs()[0] + cbs()[1]).replace(data=first.data))
        assert fx.tree_digest(restored.callbacks) == fx.tree_digest(saved_state)
        resumed = run(*cbs(), 20, m)
    assert fx.tree_digest(resumed) == fx.tree_digest(whole)


def test_early_stopping_patience_counts_on_across_a_resume(tmp_path):
    # evaluation on a fixed batch after a learning rate of 0: the loss never improves
    frozen = fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=0.0)
    stop = lambda: [fx.callbacks.early_stopping("loss", patience=3)]  # noqa: E731
    with CheckpointManager(tmp_path) as m:
        first = run([], stop(), 12, m, eval_every=4, tx=frozen)  # evals at 4, 8, 12
    es = first.callbacks["early_stopping"]
    assert int(es.wait) == 2 and not bool(es.stopped)
    with CheckpointManager(tmp_path) as m:
        end = run([], stop(), 100, m, eval_every=4, tx=frozen)
    assert int(end.step) == 16  # one more evaluation without improvement: patience 3 reached
    assert bool(end.callbacks["early_stopping"].stopped)


def test_fit_resumes_says_so_and_can_be_told_not_to(tmp_path, capsys):
    with CheckpointManager(tmp_path) as m:
        run([], [], 6, m)
        assert "resuming" not in capsys.readouterr().out
        assert int(run([], [], 9, m).step) == 9
        assert f"resuming from the checkpoint of step 6 in {tmp_path}" in capsys.readouterr().out
        assert m.all_steps() == [6, 9]
        with pytest.raises(ValueError, match="holds checkpoints up to step 9"):
            run([], [], 3, m, resume=False)
        with pytest.raises(ValueError, match="cannot save step 3 .* later checkpoint"):
            m.save(run([], [], 3))
        assert m.all_steps() == [6, 9]


def test_fit_saves_periodically_and_on_improvement_with_best_retention(tmp_path):
    policy = [fx.callbacks.checkpoint_policy(every=5, monitor="loss")]
    with CheckpointManager(tmp_path, keep_latest=1, keep_best=1, best_metric="loss") as m:
        end = run([], policy, 20, m)
        steps = m.all_steps()
        best = end.callbacks["checkpoint"]
        assert int(best.best_step) in steps and 20 in steps
        assert m.metrics(int(best.best_step))["loss"] == pytest.approx(float(best.best))


def test_fit_never_saves_a_state_nan_guard_flagged(tmp_path):
    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1))
    guard = [fx.callbacks.nan_guard("stop")]
    bad = [(X[:16], Y[:16]), (torch.full((16, 8), float("nan")), Y[:16])]
    with CheckpointManager(tmp_path) as m, pytest.warns(UserWarning, match="nan_guard flagged"):
        fx.fit(state, fx.make_train_step(xent), bad, callbacks=guard, max_epochs=1, checkpoint=m)
        assert m.all_steps() == []


def test_host_states_of_plain_python_values_survive(tmp_path):
    now = [100.0]
    timer = lambda: [fx.callbacks.timer(1000.0, time_fn=lambda: now[0])]  # noqa: E731
    at_save = []

    def clock_and_watch(state, event):
        now[0] += 1.5
        if event.kind == "checkpoint":  # the state just saved
            at_save.append(state.callbacks["timer"]["elapsed"])

    with CheckpointManager(tmp_path) as m:
        first = run([], [clock_and_watch] + timer(), 6, m)  # sees the state before the timer
        (elapsed,) = at_save
        assert elapsed > 0
        template = fx.TrainState.create(mlp((8, 16, 2), dropout=0.2), fx.optim.inject_hyperparams(
            fx.optim.adamw)(learning_rate=1e-2), callbacks=timer()).replace(data=first.data)
        back = m.restore(like=template)
    assert type(back.callbacks["timer"]["elapsed"]) is float
    assert back.callbacks["timer"]["elapsed"] == elapsed  # exact, and counting on from there


def test_restoring_a_fit_checkpoint_into_a_fresh_state(tmp_path):
    """A fresh TrainState has no data position: a full restore says how to give it one, a
    params-only restore needs none, and dropping callbacks that were not asked for is silent;
    warnings point at the caller's line."""
    import warnings
    manager = CheckpointManager(tmp_path, async_save=False)
    run([], HOST["early_stopping"](), 8, manager)
    fresh = fx.TrainState.create(mlp((8, 16, 2), dropout=0.2), fx.optim.sgd(0.1))
    with pytest.raises(fx.checkpoint.CheckpointMismatchError, match=r"batches\.init\(\)"):
        manager.restore(like=fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params_only = manager.restore(like=fresh, only=("params",))
    assert int(params_only.step) == 0 and not torch.equal(params_only.params["0.weight"],
                                                          fresh.params["0.weight"])
    like = fresh.replace(data=data().init(), opt_state=None)
    with pytest.warns(UserWarning, match="early_stopping") as caught:
        fx.checkpoint.restore(tmp_path, like=like, only=("params", "data", "callbacks"))
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match="early_stopping") as caught:
        manager.restore(like=like, only=("params", "data", "callbacks"))
    assert caught[0].filename == __file__


@pytest.mark.parametrize("where", ["in the step", "on the host"])
def test_a_callback_added_on_resume_starts_from_its_init_and_a_removed_one_is_dropped(tmp_path,
                                                                                       where):
    """A run saved without callbacks resumes with nan_guard added (its state is its init); the
    run saved with it resumes without it, dropping its state with a warning that names it."""
    guard = lambda: [fx.callbacks.nan_guard("skip")]  # noqa: E731
    with CheckpointManager(tmp_path / "plain", async_save=False) as m:
        run([], [], 8, m)
        added = run(*((guard(), []) if where == "in the step" else ([], guard())), 16, m)
        assert int(added.step) == 16 and m.all_steps() == [8, 16]
        assert int(added.callbacks["nan_guard"].skipped) == 0  # counted from its init
    with CheckpointManager(tmp_path / "guarded", async_save=False) as m:
        run([], guard(), 8, m)
        with pytest.warns(UserWarning, match="no longer present: nan_guard"):
            dropped = run([], [], 16, m)
        assert int(dropped.step) == 16 and not dropped.callbacks


def nan_at(step, steps):
    """``steps`` batches, the one of ``step`` (1-based) all NaN."""
    batches = [(X[16 * (i % 6):16 * (i % 6 + 1)], Y[16 * (i % 6):16 * (i % 6 + 1)])
               for i in range(steps)]
    batches[step - 1] = (torch.full((16, 8), float("nan")), batches[step - 1][1])
    return batches


def test_a_run_gone_nan_never_replaces_the_last_finite_checkpoint(tmp_path):
    """NaN input at step 23 with no nan_guard, keep_latest=2, saves every 5 steps: the steps
    from 25 on are not saved, retention keeps 15 and 20, fit warns, and a resume from step 20
    trains on."""
    every5 = [fx.callbacks.checkpoint_policy(every=5)]
    # an in-step callback that does not guard: its flags are read every sync_every steps, and
    # the losses are checked in that read (a fit that reads nothing checks nothing: the
    # manager's refusal is then the warning)
    watcher = [fx.callbacks.early_stopping("loss", patience=1000, event="step_end")]
    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adam(1e-2), callbacks=watcher)
    step = fx.make_train_step(xent, callbacks=watcher)
    with CheckpointManager(tmp_path, keep_latest=2, async_save=False) as m:
        with pytest.warns(RuntimeWarning) as caught:
            end = fx.fit(state, step, nan_at(23, 35), callbacks=every5, max_epochs=1,
                         checkpoint=m, sync_every=5)
        assert int(end.step) == 35 and not torch.isfinite(end.params["0.weight"]).all()
        assert m.all_steps() == [15, 20]
        said = [str(w.message) for w in caught]
        assert any("loss was NaN or infinite at a step before step 25" in s for s in said), said
        assert any("not saving step 25" in s and ".params['0.weight']" in s
                   and "the latest checkpoint stays step 20" in s for s in said), said
        fresh = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adam(1e-2), callbacks=watcher)
        good = [b for i, b in enumerate(nan_at(23, 35)) if i != 22] + [(X[:16], Y[:16])]
        resumed = fx.fit(fresh, step, good, callbacks=every5, max_epochs=1, checkpoint=m)
        assert int(resumed.step) == 35 and torch.isfinite(resumed.params["0.weight"]).all()
        assert m.all_steps() == [30, 35]


def test_a_run_a_callback_stops_says_which_and_why(tmp_path, capsys):
    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adam(1e-2),
                                 callbacks=[fx.callbacks.nan_guard("stop")])
    step = fx.make_train_step(xent, callbacks=[fx.callbacks.nan_guard("stop")])
    ends = []
    watch = lambda s, e: ends.append(e.metrics) if e.kind == "train_end" else None  # noqa: E731
    with CheckpointManager(tmp_path, async_save=False) as m:
        end = fx.fit(state, step, nan_at(23, 35), callbacks=[watch], max_epochs=1, checkpoint=m,
                     sync_every=5)
        assert m.all_steps() == [25] and torch.isfinite(end.params["0.weight"]).all()
    out = capsys.readouterr().out
    assert ("fxtrain: stopped at step 25 by nan_guard: a step's loss or gradient norm was not "
            "finite (its update was discarded)") in out, out
    assert ends[-1]["reason"] == "stopped" and ends[-1]["stopped_by"].startswith("nan_guard")

    def host_stop(s, e):
        return s, fx.Control(stop=e.kind == "step_end" and e.step == 3)
    plain = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adam(1e-2))
    fx.fit(plain, fx.make_train_step(xent), nan_at(23, 35), callbacks=[host_stop], max_epochs=1)
    out = capsys.readouterr().out
    assert "fxtrain: stopped at step 3 by " in out and "host_stop asked to stop" in out, out
