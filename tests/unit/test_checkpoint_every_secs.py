"""checkpoint_policy(every_secs=...): timed saves with a fake clock (no sleeping), restarted by
every save, refused inside a step; the same steps on every rank (the 2-process case is in
tests/unit/test_distributed.py)."""

import pytest

import fxtrain as fx
from fxtrain.callbacks import fold
from helpers import classification_batch, mlp, xent


class Clock:
    """A fake clock that moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_asks_every_interval_from_train_begin_and_restarts_at_any_save():
    clock = Clock()
    policy = fx.callbacks.checkpoint_policy(every_secs=60, time_fn=clock)
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    state, _ = fold([policy], state, fx.Event("train_begin", 0, 0, {}))
    asked = []
    for step in range(1, 13):
        clock.now += 25.0
        state, control = fold([policy], state, fx.Event("step_end", step, 0, {}))
        if control.save:
            asked.append(step)
        if step == 7:  # another save (a best checkpoint, say) at t = 175 s
            fold([policy], state, fx.Event("checkpoint", step, 0, {"step": step}))
    # t = 75 (step 3), 150 (step 6); the save at 175 restarts the clock: 250 (step 10)
    assert asked == [3, 6, 10]


def run_fit(policy, clock, tmp_path, steps=10):
    tick = fx.callbacks.lambda_callback(  # each step takes 25 s of the fake clock
        on_step_end=lambda s, e: setattr(clock, "now", clock.now + 25.0))
    saved = []
    seen = fx.callbacks.lambda_callback(on_checkpoint=lambda s, e: saved.append(e.step))
    with fx.checkpoint.CheckpointManager(tmp_path, keep_latest=20, async_save=False) as manager:
        fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)), fx.make_train_step(xent),
               [classification_batch()] * steps, max_epochs=1, checkpoint=manager,
               callbacks=[tick, policy, seen])
        assert manager.all_steps() == saved
    return saved


def test_fit_saves_at_the_step_the_clock_runs_out(tmp_path):
    clock = Clock()
    policy = fx.callbacks.checkpoint_policy(every_secs=60, time_fn=clock)
    assert run_fit(policy, clock, tmp_path) == [3, 6, 9, 10]  # 10: the final save


def test_periodic_saves_restart_the_timed_clock(tmp_path):
    clock = Clock()
    policy = fx.callbacks.checkpoint_policy(4, every_secs=60, time_fn=clock)
    # 3 (75 s), 4 (every 4; clock restarts at 100 s), 7 (175 s), 8 (every 4), 10 (final)
    assert run_fit(policy, clock, tmp_path) == [3, 4, 7, 8, 10]


def test_a_timed_policy_is_refused_inside_a_step_and_bad_intervals_by_name():
    policy = fx.callbacks.checkpoint_policy(every_secs=60)
    assert policy.host
    with pytest.raises(ValueError, match="fit"):
        fx.make_train_step(xent, callbacks=[policy])
    assert not fx.callbacks.checkpoint_policy(every=5).host
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="every_secs must be > 0"):
            fx.callbacks.checkpoint_policy(every_secs=bad)
