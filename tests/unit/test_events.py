"""The loop's events beyond the steps: epoch_begin, step_begin, epoch_end's means, the exception
event, and every request a callback makes at train_begin."""

import pytest
import torch

import fxtrain as fx
from fxtrain.metrics._means import Means
from helpers import FakeManager, mlp, xent

X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def setup():
    state = fx.TrainState.create(mlp((8, 16, 2), dropout=0.0), fx.optim.adamw(1e-2), seed=0)
    return state, fx.make_train_step(xent)


def kinds_seen(log):
    def cb(state, event):
        log.append((event.kind, event.step, event.epoch))
    return cb


def test_epoch_begin_opens_each_epoch_and_the_one_a_resumed_run_continues():
    log = []
    state, step = setup()
    data = fx.data.Batches((X, Y), 32)  # 3 batches per epoch
    state = fx.fit(state, step, data, max_steps=4, callbacks=[kinds_seen(log)])
    assert [k for k, _, _ in log] == ["setup", "train_begin", "epoch_begin", "step_end", "step_end",
                                      "step_end", "epoch_end", "epoch_begin", "step_end",
                                      "train_end"]
    assert [(s, e) for k, s, e in log if k == "epoch_begin"] == [(0, 0), (3, 1)]
    log.clear()
    fx.fit(state, step, data, max_epochs=2, callbacks=[kinds_seen(log)])  # resumes mid-epoch
    assert [(k, s, e) for k, s, e in log if "epoch" in k] == [
        ("epoch_begin", 4, 1), ("epoch_end", 6, 1)]


def test_step_begin_goes_only_to_callbacks_that_ask_for_it_before_each_step():
    seen, plain = [], []

    def before(state, event):
        seen.append((event.kind, event.step))
        return state, fx.Control()

    asks = fx.callbacks.Callback("before", None, before, kinds=("step_begin", "step_end"))
    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=3,
           callbacks=[asks, kinds_seen(plain), fx.callbacks.on("step_begin", kinds_seen(plain))])
    assert seen == [("step_begin", 0), ("step_end", 1), ("step_begin", 1), ("step_end", 2),
                    ("step_begin", 2), ("step_end", 3)]
    begins = [s for k, s, _ in plain if k == "step_begin"]
    assert begins == [0, 1, 2]  # from on("step_begin", ...); the plain function never gets one
    assert "step_begin" not in fx.callbacks.DEFAULT_KINDS
    assert fx.callbacks.as_callback(print).kinds == fx.callbacks.DEFAULT_KINDS


def test_a_stop_asked_at_step_begin_ends_the_run_after_that_step():
    stop = fx.callbacks.Callback(
        "stop", None, lambda s, e: (s, fx.Control(stop=e.step == 2)), kinds=("step_begin",))
    state, step = setup()
    end = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=10, callbacks=[stop])
    assert int(end.step) == 3


def test_epoch_end_carries_the_epochs_mean_training_metrics_and_its_last_evaluation():
    losses, ends = {}, []

    def cb(state, event):
        if event.kind == "step_end":
            losses.setdefault(event.epoch, []).append(float(event.metrics["loss"]))
        elif event.kind == "epoch_end":
            ends.append(dict(event.metrics))

    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 16), max_epochs=2, callbacks=[cb],
           eval_step=fx.make_eval_step(xent),
           eval_data=fx.data.Batches((X, Y), 48, shuffle=False))
    assert len(ends) == 2
    for epoch, metrics in enumerate(ends):
        assert float(metrics["loss"]) == pytest.approx(sum(losses[epoch]) / 6, rel=1e-6)
        assert "eval/loss" in metrics and metrics["eval/loss"].ndim == 0
        assert not any(k.startswith("control/") for k in metrics)
    assert float(ends[1]["loss"]) < float(ends[0]["loss"])


def test_epoch_means_fold_long_epochs_and_leave_out_flags_and_shaped_metrics():
    means, values = Means(collapse=64), torch.randn(200, generator=torch.Generator().manual_seed(1))
    for i, v in enumerate(values):
        metrics = {"loss": v, "steps": torch.tensor(i), "hist": torch.ones(3), "lr": 0.5,
                   "control/stop": torch.tensor(False), "flag": True}
        if i % 2:
            metrics["accuracy"] = v.abs()
        means.add(metrics)
    assert len(means.pending) < 64  # folded into sums as it went
    out = means.take()
    assert sorted(out) == ["accuracy", "flag", "loss", "lr", "steps"]
    torch.testing.assert_close(out["loss"], values.mean())
    torch.testing.assert_close(out["accuracy"], values[1::2].abs().mean())
    assert float(out["lr"]) == 0.5


def test_an_error_is_delivered_as_an_exception_event_then_train_end_then_raised(tmp_path):
    log, errors = [], []

    def batches():
        for i in range(5):
            if i == 3:
                raise RuntimeError("the data source broke")
            yield X[:16], Y[:16]

    def on_error(state, event):
        if event.kind == "exception":
            errors.append(event.error)
            return state, fx.Control(save=True)

    manager = FakeManager()
    state, step = setup()
    with pytest.raises(RuntimeError, match="the data source broke") as raised:
        fx.fit(state, step, batches(), callbacks=[kinds_seen(log), on_error],
               checkpoint=manager, max_steps=10)
    assert [k for k, _, _ in log][-4:] == ["step_end", "exception", "checkpoint", "train_end"]
    # a plain iterator is read one batch ahead (to see an epoch's end), so batch 3 fails at step 2
    assert errors == [raised.value] and log[-2][1] == 2
    assert manager.saved == [2]  # the save the exception event asked for


def test_a_callback_that_fails_on_the_exception_event_leaves_the_first_error_raised():
    def broken(state, event):
        if event.kind == "exception":
            raise ValueError("callback bug")

    def bad_loss(state, params, batch):
        raise ZeroDivisionError("inside the loss")

    state, _ = setup()
    with pytest.raises(ZeroDivisionError, match="inside the loss") as raised:
        fx.fit(state, fx.make_train_step(bad_loss), fx.data.Batches((X, Y), 32), max_steps=2,
               callbacks=[broken])
    assert any("callback bug" in note for note in raised.value.__notes__)


def test_every_request_made_at_train_begin_is_honoured(tmp_path):
    log, first_step = [], {}

    def asks(state, event):
        if event.kind == "train_begin":
            return state, fx.Control(evaluate=True, save=True, log=True)
        if event.kind == "step_end" and not first_step:
            first_step.update(log=event.metrics.get("control/log"))

    manager = FakeManager()
    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=2, checkpoint=manager,
           callbacks=[asks, kinds_seen(log)],
           eval_step=fx.make_eval_step(xent),
           eval_data=fx.data.Batches((X, Y), 48, shuffle=False))
    assert [k for k, _, _ in log][:5] == ["setup", "train_begin", "eval_begin", "eval_end",
                                         "checkpoint"]
    assert manager.saved[0] == 0 and first_step["log"] is True

    stops = lambda s, e: (s, fx.Control(stop=e.kind == "train_begin"))  # noqa: E731
    end = fx.fit(setup()[0], step, fx.data.Batches((X, Y), 32), max_steps=2, callbacks=[stops])
    assert int(end.step) == 0


def test_an_evaluation_asked_for_without_eval_data_warns_instead_of_failing():
    state, step = setup()
    asks = lambda s, e: (s, fx.Control(evaluate=e.kind == "step_end"))  # noqa: E731
    with pytest.warns(UserWarning, match="no eval_step"):
        end = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=2, callbacks=[asks])
    assert int(end.step) == 2


def test_an_exception_event_holds_its_error_and_no_other_does():
    with pytest.raises(ValueError, match="only an exception event"):
        fx.Event("step_end", 1, error=RuntimeError("x"))
    with pytest.raises(ValueError, match="holds its error"):
        fx.Event("exception", 1)


def test_setup_and_restore_come_before_train_begin(tmp_path):
    log = []
    state, step = setup()
    data = fx.data.Batches((X, Y), 32)
    with fx.checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        fx.fit(state, step, data, max_steps=3, checkpoint=manager)
        again, _ = setup()
        fx.fit(again, step, data, max_steps=5, checkpoint=manager,
               callbacks=[fx.callbacks.Callback("rec", None, lambda s, e: log.append(e),
                                                kinds=("setup", "restore", "train_begin"))])
    assert [e.kind for e in log] == ["setup", "restore", "train_begin"]
    assert log[1].metrics["step"] == 3 and log[1].metrics["path"].endswith("/3")
    assert log[0].metrics["max_steps"] == 5  # the plan, as train_begin's


def test_eval_begin_and_eval_batch_go_around_each_evaluation():
    seen, plain = [], []
    rec = fx.callbacks.Callback("rec", None, lambda s, e: seen.append((e.kind, e.step)),
                                kinds=("eval_begin", "eval_batch", "eval_end"))
    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=4, eval_every=2,
           eval_step=fx.make_eval_step(xent),
           eval_data=fx.data.Batches((X, Y), 48, shuffle=False), callbacks=[rec, kinds_seen(plain)])
    assert seen == [("eval_begin", 2), ("eval_batch", 2), ("eval_batch", 2), ("eval_end", 2),
                    ("eval_begin", 4), ("eval_batch", 4), ("eval_batch", 4), ("eval_end", 4)]
    assert "eval_batch" not in {k for k, _, _ in plain} and "eval_begin" in {k for k, _, _ in plain}


@pytest.mark.parametrize("as_list", [False, True], ids=["Batches", "iterable"])
def test_stop_epoch_ends_the_epoch_and_the_data_goes_on_at_the_next(as_list):
    def one_step_per_epoch(state, event):
        return state, fx.Control(stop_epoch=event.kind == "step_end")

    log = []
    data = fx.data.Batches((X, Y), 32, shuffle=False)  # 3 batches per epoch
    batches = list(data) if as_list else data
    state, step = setup()
    end = fx.fit(state, step, batches, max_epochs=3, callbacks=[one_step_per_epoch,
                                                                kinds_seen(log)])
    assert int(end.step) == 3 and int(end.data.epoch) == 3 and int(end.data.index) == 0
    assert [(k, s, e) for k, s, e in log if k == "epoch_end"] == [
        ("epoch_end", 1, 0), ("epoch_end", 2, 1), ("epoch_end", 3, 2)]
    ref, _ = setup()  # each epoch's first batch: batch 0 three times
    for _ in range(3):
        ref, _ = step(ref, next(iter(data)))
    assert fx.tree_digest(end.params) == fx.tree_digest(ref.params)


def test_abort_ends_the_run_without_the_final_checkpoint(tmp_path):
    ended = []

    def abort_at_2(state, event):
        if event.kind == "train_end":
            ended.append(event.metrics["reason"])
        return state, fx.Control(abort=event.kind == "step_end" and event.step == 2)

    state, step = setup()
    with fx.checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        end = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=10, checkpoint=manager,
                     callbacks=[abort_at_2])
        assert manager.all_steps() == []  # nothing saved, not even at the end
    assert int(end.step) == 2 and ended == ["aborted"]


def test_an_in_step_callback_cannot_ask_for_stop_epoch_or_abort():
    cb = fx.callbacks.Callback("ends", None, lambda s, e: (s, fx.Control(stop_epoch=True)),
                               kinds=("step_end",))
    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1), callbacks=[cb])
    with pytest.raises(ValueError, match="only host callbacks"):
        fx.make_train_step(xent, callbacks=[cb])(state, (X[:8], Y[:8]))
