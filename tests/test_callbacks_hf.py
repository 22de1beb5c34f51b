import json

import pytest
import torch
from helpers import extra, mlp

import fxtrain as fx
from fxtrain.callbacks.core import Control, Event, fold
from fxtrain.callbacks.hf import hf_callback

transformers = extra("transformers")  # every test here needs it (the extra-less error: test_extras)

EARLY = {"metric_for_best_model": "eval_loss"}


def _state(*callbacks):
    return fx.TrainState.create(mlp(), fx.optim.sgd(0.1), callbacks=callbacks)


def _begin(cb, state, **plan):
    return fold([cb], state, Event("train_begin", 0, 0, {"max_steps": None, **plan}))


def _evaluate(cb, state, step, loss):
    return fold([cb], state, Event("eval_end", step, 0, {"loss": torch.tensor(loss)}))


class Recorder(transformers.TrainerCallback):
    """Records (hook, global_step) and the logs and metrics it is given."""

    def __init__(self):
        self.seen, self.logs, self.metrics = [], [], []

    def _note(self, hook, state):
        self.seen.append((hook, state.global_step))

    def on_train_begin(self, args, state, control, **kw):
        self._note("on_train_begin", state)

    def on_epoch_begin(self, args, state, control, **kw):
        self._note("on_epoch_begin", state)

    def on_step_begin(self, args, state, control, **kw):
        self._note("on_step_begin", state)

    def on_step_end(self, args, state, control, **kw):
        self._note("on_step_end", state)

    def on_log(self, args, state, control, logs=None, **kw):
        self._note("on_log", state)
        self.logs.append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self._note("on_evaluate", state)
        self.metrics.append(dict(metrics))

    def on_epoch_end(self, args, state, control, **kw):
        self._note("on_epoch_end", state)

    def on_save(self, args, state, control, **kw):
        self._note("on_save", state)

    def on_train_end(self, args, state, control, **kw):
        self._note("on_train_end", state)


def test_early_stopping_stops_at_the_right_eval():
    cb = hf_callback(transformers.EarlyStoppingCallback(early_stopping_patience=2), args=EARLY)
    assert cb.name == "hf_EarlyStoppingCallback" and cb.host
    state, _ = _begin(cb, _state(cb))
    stops = []
    for i, loss in enumerate([1.0, 0.8, 0.9, 0.85]):
        state, control = _evaluate(cb, state, 10 * (i + 1), loss)
        stops.append(control.stop)
    assert stops == [False, False, False, True]  # two evals without improving on 0.8
    saved = state.callbacks["hf_EarlyStoppingCallback"]
    assert saved["trainer_state"]["best_metric"] == pytest.approx(0.8)
    assert saved["trainer_state"]["best_global_step"] == 20
    assert saved["callback"]["attributes"]["early_stopping_patience_counter"] >= 2


def test_early_stopping_patience_survives_a_round_trip():
    def fresh():
        return hf_callback(transformers.EarlyStoppingCallback(early_stopping_patience=2),
                           args=EARLY)

    first = fresh()
    state, _ = _begin(first, _state(first))
    for step, loss in [(10, 1.0), (20, 0.8), (30, 0.9)]:  # one eval without improvement
        state, control = _evaluate(first, state, step, loss)
    assert not control.stop
    kept = json.loads(json.dumps(state.callbacks))  # as a checkpoint would store it

    again = fresh()  # a new process: fresh callback objects, state from the checkpoint
    state = _state(again).replace(callbacks=kept)
    state, _ = _begin(again, state)
    state, control = _evaluate(again, state, 40, 0.85)  # worse than 0.8: second strike
    assert control.stop
    kept = state.callbacks["hf_EarlyStoppingCallback"]["trainer_state"]
    assert kept["best_metric"] == pytest.approx(0.8)

    unrestored = fresh()  # the same eval without the saved state does not stop
    state, _ = _begin(unrestored, _state(unrestored))
    assert not _evaluate(unrestored, state, 40, 0.85)[1].stop


def test_hooks_arrive_in_order_with_float_logs():
    rec = Recorder()
    cb = hf_callback(rec, log_every=2)
    state, _ = _begin(cb, _state(cb), max_epochs=2, steps_per_epoch=2)
    for step in (1, 2):
        metrics = {"loss": torch.tensor(0.5 * step), "control/stop": torch.tensor(False)}
        state, _ = fold([cb], state, Event("step_end", step, 0, metrics))
    state, _ = _evaluate(cb, state, 2, 0.25)
    state, _ = fold([cb], state, Event("epoch_end", 2, 0))
    state, _ = fold([cb], state, Event("checkpoint", 2, 1, {"step": 2, "path": "/ckpt/2"}))
    state, _ = fold([cb], state, Event("train_end", 2, 1, {"reason": "max_steps"}))
    assert rec.seen == [
        ("on_train_begin", 0), ("on_epoch_begin", 0),
        ("on_step_begin", 1), ("on_step_end", 1),
        ("on_step_begin", 2), ("on_step_end", 2), ("on_log", 2),
        ("on_log", 2), ("on_evaluate", 2),
        ("on_epoch_end", 2), ("on_epoch_begin", 2),
        ("on_save", 2), ("on_train_end", 2)]
    assert rec.logs[0] == {"loss": 1.0, "epoch": 1.0}
    assert type(rec.logs[0]["loss"]) is float
    assert rec.metrics == [{"eval_loss": 0.25}]


def test_no_epoch_begin_after_the_last_epoch():
    rec = Recorder()
    cb = hf_callback(rec)
    state, _ = _begin(cb, _state(cb), max_epochs=1)
    fold([cb], state, Event("epoch_end", 5, 0))
    assert [h for h, _ in rec.seen] == ["on_train_begin", "on_epoch_begin", "on_epoch_end"]


def test_metrics_are_not_read_between_logs():
    rec = Recorder()
    cb = hf_callback(rec, log_every=50)
    state, _ = _begin(cb, _state(cb))
    unreadable = {"loss": torch.empty((), device="meta")}  # reading it would raise
    fold([cb], state, Event("step_end", 1, 0, unreadable))
    assert rec.logs == [] and ("on_step_end", 1) in rec.seen
    with pytest.raises(Exception):
        fold([cb], state, Event("step_end", 50, 0, unreadable))


class Asker(transformers.TrainerCallback):
    """Sets each control flag at a chosen step."""

    def on_step_end(self, args, state, control, **kw):
        control.should_save = state.global_step == 2
        control.should_evaluate = state.global_step == 3
        control.should_log = state.global_step == 4
        control.should_training_stop = state.global_step == 5


def test_control_flags_become_fx_controls_once():
    cb = hf_callback(Asker())
    state, _ = _begin(cb, _state(cb))
    controls = []
    for step in range(1, 6):
        state, c = fold([cb], state, Event("step_end", step, 0, {"loss": torch.tensor(1.0)}))
        controls.append(c)
        if step == 2:  # the save was handed over at step_end; an eval in the same step
            assert _evaluate(cb, state, step, 1.0)[1] == Control()  # does not ask again
    assert controls == [Control(), Control(save=True), Control(evaluate=True), Control(log=True),
                        Control(stop=True)]
    state, c = _evaluate(cb, state, 5, 1.0)
    assert c == Control(stop=True)  # stop stays asked for; save/evaluate/log were handed over


def test_user_training_arguments_pass_through(tmp_path):
    rec = Recorder()
    args = {"output_dir": str(tmp_path), "metric_for_best_model": "accuracy",
            "greater_is_better": True}
    cb = hf_callback(rec, args=args, name="rec")
    state, _ = _begin(cb, _state(cb))
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        state, _ = fold([cb], state, Event("eval_end", step, 0, {"accuracy": torch.tensor(acc)}))
    assert state.callbacks["rec"]["trainer_state"]["best_metric"] == pytest.approx(0.7)
    assert state.callbacks["rec"]["callback"] is None  # Recorder is not an ExportableState


def test_missing_best_metric_is_a_clear_error():
    cb = hf_callback(Recorder(), args={"metric_for_best_model": "eval_bleu"})
    state, _ = _begin(cb, _state(cb))
    with pytest.raises(KeyError, match="eval_bleu.*eval_loss"):
        _evaluate(cb, state, 1, 0.5)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="TrainerCallback"):
        hf_callback(lambda s, e: None)
    with pytest.raises(TypeError, match="no_such_field"):
        hf_callback(Recorder(), args={"no_such_field": 1})
    with pytest.raises(TypeError, match="args must be"):
        hf_callback(Recorder(), args=42)
    with pytest.raises(ValueError, match="log_every"):
        hf_callback(Recorder(), log_every=0)


def test_making_the_callback_leaves_no_directory_behind(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for _ in range(3):
        cb = hf_callback(transformers.TrainerCallback())
        _begin(cb, _state(cb))
    assert not list(tmp_path.iterdir())  # it once made a directory per call, never removed


# -- the objects the hooks get: model, optimizer, lr_scheduler --------------------------------

def _regression(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :4] * 2 - 1


def _mse(state, params, batch):
    x, y = batch
    return ((state.apply(params, x) - y) ** 2).mean()


def _fit(state, *callbacks, steps=4, **kw):
    return fx.fit(state, fx.make_train_step(_mse), fx.data.Batches(_regression(), 4),
                  max_steps=steps, callbacks=callbacks, **kw)


class SavePretrained(transformers.TrainerCallback):
    """Saves the model the Trainer's way at the end of training."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, args, state, control, model=None, **kw):
        model.save_pretrained(self.directory)


def test_a_callback_can_save_pretrained_and_the_weights_load_back(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2))
    ids = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(state, params, batch):
        return state.apply(params, batch, labels=batch, use_cache=False)

    state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(ids, 4), max_steps=3,
                   callbacks=[hf_callback(SavePretrained(tmp_path / "model"))])
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    weights = dict(loaded.named_parameters())
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
    for key, value in state.params.items():  # the trained weights, not the initial ones
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    initial = dict(model.named_parameters())["transformer.wte.weight"]
    assert not torch.equal(weights["transformer.wte.weight"], initial)


class Reads(transformers.TrainerCallback):
    """Reads the optimizer's learning rate, the scheduler's and the model's class per step."""

    def __init__(self, touch_model=True):
        self.lrs, self.last_lrs, self.models, self.touch_model = [], [], [], touch_model

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, model=None,
                    **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.last_lrs.append(lr_scheduler.get_last_lr()[0])
        assert len(optimizer.param_groups[0]["params"]) == 4  # mlp: two weights, two biases
        if self.touch_model:
            self.models.append((isinstance(model, torch.nn.Sequential), model[0].weight.shape))


def test_hooks_see_the_learning_rate_and_the_model():
    reads = Reads()
    tx = fx.optim.sgd(fx.optim.linear_schedule(0.1, 0.0, transition_steps=4))
    _fit(fx.TrainState.create(mlp(), tx), hf_callback(reads), steps=4)
    assert reads.lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])  # the rate each update used
    assert reads.last_lrs == reads.lrs
    assert reads.models == [(True, (16, 8))] * 4


def test_the_model_is_built_only_when_a_hook_uses_it(monkeypatch):
    built = []
    real = fx.trained_module
    monkeypatch.setattr("fxtrain.callbacks.hf_views.trained_module",
                        lambda state: built.append(int(state.step)) or real(state))
    _fit(_state(), hf_callback(Reads(touch_model=False)), steps=3)
    assert built == []  # three steps, no copy of the weights
    _fit(_state(), hf_callback(Reads(touch_model=True)), steps=3)
    assert built == [1, 2, 3]  # once per event that touched it


# -- load_best_model_at_end -----------------------------------------------------------------

BEST = {"load_best_model_at_end": True, "metric_for_best_model": "loss"}


class SeesTheEnd(transformers.TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        self.weight = model[0].weight.detach().clone()


def _diverging(tmp_path, args, **manager):
    """lr 1.5 on this problem: the evaluation loss grows after the first step."""
    manager = fx.checkpoint.CheckpointManager(tmp_path, async_save=False, **manager)
    end = SeesTheEnd()
    cb = hf_callback(end, args=args, checkpoint=manager)
    batch = _regression()
    state = fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(1.5)), fx.make_train_step(_mse),
                   fx.data.Batches(batch, 4), max_steps=5, eval_step=fx.make_eval_step(_mse),
                   eval_data=[batch], eval_every=1, checkpoint=manager,
                   callbacks=[cb, fx.callbacks.checkpoint_policy(every=1)])
    return state, manager, end


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    state, manager, end = _diverging(tmp_path, BEST, keep_best=1, best_metric="loss")
    losses = {s: manager.metrics(s).get("loss") for s in manager.all_steps()}
    best = manager.best_step()
    assert best < 5 and losses[best] < losses[5]  # the run got worse: the best is earlier
    saved = manager.restore(state, best)
    assert int(state.step) == 5  # the weights go back, the count stays (as the Trainer's)
    for key in state.params:
        assert torch.equal(state.params[key], saved.params[key])
    assert torch.equal(end.weight, saved.params["0.weight"])  # on_train_end sees the best
    assert fx.callbacks.callback_state(state, "hf_SeesTheEnd")["trainer_state"][
        "best_model_checkpoint"] == str(manager.directory / str(best))


def test_without_load_best_the_final_weights_stay(tmp_path):
    state, manager, _ = _diverging(tmp_path, {"metric_for_best_model": "loss"},
                                   keep_best=1, best_metric="loss")
    final = manager.restore(state, 5)
    assert all(torch.equal(state.params[k], final.params[k]) for k in state.params)


def test_load_best_model_at_end_needs_a_manager_that_keeps_the_best(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint=manager.*keep_best=1, best_metric='loss'"):
        hf_callback(Recorder(), args=BEST)
    plain = fx.checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"keep_best=0 by best_metric=None"):
        hf_callback(Recorder(), args=BEST, checkpoint=plain)
    other = fx.checkpoint.CheckpointManager(tmp_path, keep_best=1, best_metric="accuracy",
                                            best_mode="max")
    with pytest.raises(ValueError, match=r"ranks checkpoints by 'loss' \(min\).*'accuracy'"):
        hf_callback(Recorder(), args=BEST, checkpoint=other)
    accuracy = {**BEST, "metric_for_best_model": "eval_accuracy"}  # greater is better
    hf_callback(Recorder(), args=accuracy, checkpoint=other)  # matches: accepted


def test_load_best_without_a_saved_best_warns_and_keeps_the_weights(tmp_path):
    manager = fx.checkpoint.CheckpointManager(tmp_path, async_save=False, keep_best=1,
                                              best_metric="loss")
    cb = hf_callback(Recorder(), args=BEST, checkpoint=manager)
    batch = _regression()
    with pytest.warns(UserWarning, match=r"no checkpoint was saved at the best evaluation"):
        state = fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(1.5)),
                       fx.make_train_step(_mse), fx.data.Batches(batch, 4), max_steps=5,
                       eval_step=fx.make_eval_step(_mse), eval_data=[batch], eval_every=1,
                       checkpoint=manager, callbacks=[cb])  # one save, at the end
    assert manager.all_steps() == [5] and int(state.step) == 5


# -- should_epoch_stop ----------------------------------------------------------------------

class EndsEpochs(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        control.should_epoch_stop = True


def test_should_epoch_stop_warns_once_that_fit_cannot_honour_it():
    with pytest.warns(UserWarning, match="should_epoch_stop") as caught:
        state = _fit(_state(), hf_callback(EndsEpochs()), steps=6)
    assert int(state.step) == 6  # the run went on
    assert sum("should_epoch_stop" in str(w.message) for w in caught) == 1
