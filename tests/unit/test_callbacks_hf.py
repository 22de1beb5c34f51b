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


def test_logs_are_floats_with_the_epoch():
    rec = Recorder()
    cb = hf_callback(rec, log_every=2)
    state, _ = _begin(cb, _state(cb), max_epochs=2, steps_per_epoch=2)
    for step in (1, 2):
        metrics = {"loss": torch.tensor(0.5 * step), "control/stop": torch.tensor(False)}
        state, _ = fold([cb], state, Event("step_end", step, 0, metrics))
    state, _ = _evaluate(cb, state, 2, 0.25)
    assert rec.logs == [{"loss": 1.0, "epoch": 1.0}, {"eval_loss": 0.25, "epoch": 1.0}]
    assert type(rec.logs[0]["loss"]) is float  # control/* flags left out
    assert rec.metrics == [{"eval_loss": 0.25}]


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
    unkept = fx.checkpoint.CheckpointManager(tmp_path, keep_best=0, best_metric="loss")
    with pytest.raises(ValueError, match=r"keep_best=0 by best_metric='loss'"):
        hf_callback(Recorder(), args=BEST, checkpoint=unkept)
    accuracy = {**BEST, "metric_for_best_model": "eval_accuracy"}  # greater is better
    hf_callback(Recorder(), args=accuracy, checkpoint=other)  # matches: accepted


def test_the_best_model_checkpoint_is_the_saved_best_steps():
    cb = hf_callback(Recorder(), args={"metric_for_best_model": "loss"}, name="rec")
    state, _ = _begin(cb, _state(cb))
    for step, loss in [(2, 0.5), (3, 0.7)]:
        state, _ = _evaluate(cb, state, step, loss)
        state, _ = fold([cb], state, Event("checkpoint", step, 0,
                                           {"step": step, "path": f"/ckpt/{step}"}))
        assert state.callbacks["rec"]["trainer_state"]["best_model_checkpoint"] == "/ckpt/2"


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


def test_should_epoch_stop_ends_each_epoch_in_fit():
    data = fx.data.Batches(_regression(), 4)
    assert len(data) > 1
    state = fx.fit(_state(), fx.make_train_step(_mse), data, max_epochs=3,
                   callbacks=[hf_callback(EndsEpochs())])
    assert int(state.step) == 3 and int(state.data.epoch) == 3  # one step per epoch


class Aborts(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        control.should_abort_without_save = state.global_step == 2  # Forgather's flag


def test_should_abort_without_save_ends_the_run_without_saving(tmp_path):
    with fx.checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        state = _fit(_state(), hf_callback(Aborts()), steps=6, checkpoint=manager)
        assert manager.all_steps() == []
    assert int(state.step) == 2


# -- the Trainer's order ----------------------------------------------------------------------

HOOKS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin",
         "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_log",
         "on_prediction_step", "on_evaluate", "on_save", "on_epoch_end", "on_train_end",
         "on_predict")


class Sequence(transformers.TrainerCallback):
    """Records (hook, global_step) for every hook."""

    def __init__(self):
        self.seen = []


for _hook in HOOKS:
    setattr(Sequence, _hook, lambda self, args, state, control, _h=_hook, **kw:
            self.seen.append((_h, state.global_step)))

# Three runs over 8 training samples in batches of 2 (4 steps an epoch), 4 evaluation samples
# (2 batches) and 6 to predict (3 batches): the Trainer's settings and fit's for the same run.
RUNS = {
    "epochs": ({"num_train_epochs": 2, "eval_steps": 2, "save_steps": 4, "logging_steps": 2},
               {"max_epochs": 2, "eval_every": 2, "save_every": 4, "log_every": 2}),
    "max_steps": ({"max_steps": 6, "eval_steps": 3, "save_steps": 3, "logging_steps": 3},
                  {"max_steps": 6, "eval_every": 3, "save_every": 3, "log_every": 3}),
    "accumulation": ({"num_train_epochs": 1, "eval_strategy": "no", "save_strategy": "no",
                      "logging_steps": 1, "gradient_accumulation_steps": 2},
                     {"max_epochs": 1, "log_every": 1, "accumulate": 2}),
}


def _steps(first, last, *, k=1):
    """The Trainer's hooks for optimizer steps first..last (k micro-batches each)."""
    out = []
    for step in range(first - 1, last):
        out += [("on_step_begin", step)] + [("on_substep_end", step)] * (k - 1)
        out += [("on_pre_optimizer_step", step), ("on_optimizer_step", step),
                ("on_step_end", step + 1)]
    return out


def _evaluation(step):
    return [("on_prediction_step", step)] * 2 + [("on_log", step), ("on_evaluate", step)]


# What transformers 5.23.0's Trainer calls (recorded with accelerate 1.15.0 by _trainer_run;
# read in transformers/trainer.py: Trainer.__init__ -> on_init_end, _inner_training_loop ->
# on_train_begin and on_epoch_begin, _run_epoch -> on_step_begin, on_substep_end,
# on_pre_optimizer_step, on_optimizer_step, on_step_end, _maybe_log_save_evaluate -> on_log,
# evaluate (evaluation_loop -> on_prediction_step per batch, on_log, on_evaluate), on_save,
# then on_epoch_end; _finalize_training -> on_log, on_train_end; predict -> on_prediction_step
# per batch, on_predict). Checked against a live Trainer where accelerate is installed.
TRAINER = {
    "epochs": [("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
               *_steps(1, 2), ("on_log", 2), *_evaluation(2),
               *_steps(3, 4), ("on_log", 4), *_evaluation(4), ("on_save", 4),
               ("on_epoch_end", 4), ("on_epoch_begin", 4),
               *_steps(5, 6), ("on_log", 6), *_evaluation(6),
               *_steps(7, 8), ("on_log", 8), *_evaluation(8), ("on_save", 8),
               ("on_epoch_end", 8), ("on_log", 8), ("on_train_end", 8),
               *[("on_prediction_step", 8)] * 3, ("on_predict", 8)],
    "max_steps": [("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
                  *_steps(1, 3), ("on_log", 3), *_evaluation(3), ("on_save", 3),
                  *_steps(4, 4), ("on_epoch_end", 4), ("on_epoch_begin", 4),
                  *_steps(5, 6), ("on_log", 6), *_evaluation(6), ("on_save", 6),
                  ("on_epoch_end", 6), ("on_log", 6), ("on_train_end", 6),
                  *[("on_prediction_step", 6)] * 3, ("on_predict", 6)],
    "accumulation": [("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0),
                     *_steps(1, 1, k=2), ("on_log", 1), *_steps(2, 2, k=2), ("on_log", 2),
                     ("on_epoch_end", 2), ("on_log", 2), ("on_train_end", 2),
                     *[("on_prediction_step", 2)] * 3, ("on_predict", 2)],
}


def _trainer_run(settings):
    """The hooks a real ``transformers.Trainer`` calls for ``settings`` (needs accelerate)."""
    import tempfile

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, x, labels):
            return {"loss": ((self.linear(x) - labels) ** 2).mean()}

    def dataset(n):
        x, y = _regression(n)
        return [{"x": a, "labels": b} for a, b in zip(x, y)]

    seen = Sequence()
    settings = {"eval_strategy": "steps", "save_strategy": "steps", **settings}
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            tmp, per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to="none",
            remove_unused_columns=False, use_cpu=True, disable_tqdm=True, **settings)
        trainer = transformers.Trainer(Model(), args, train_dataset=dataset(8),
                                       eval_dataset=dataset(4), callbacks=[seen])
        trainer.train()
        trainer.predict(dataset(6))
    return seen.seen


def _fit_run(settings, tmp_path):
    """The hooks hf_callback calls in fit for the same run."""
    settings = dict(settings)
    k, save_every = settings.pop("accumulate", 1), settings.pop("save_every", None)
    seen = Sequence()
    cb = hf_callback(seen, args={"gradient_accumulation_steps": k},
                     log_every=settings.pop("log_every"))
    x, y = _regression(8)
    evaluation = {}
    if "eval_every" in settings:
        evaluation = {"eval_step": fx.make_eval_step(_mse),
                      "eval_data": fx.data.Batches(_regression(4), 2, shuffle=False)}
    saving, callbacks = {}, [cb]
    if save_every:
        saving = {"checkpoint": fx.checkpoint.CheckpointManager(tmp_path, async_save=False)}
        callbacks.append(fx.callbacks.checkpoint_policy(every=save_every))
    tx = fx.optim.multi_steps(fx.optim.sgd(0.01), every_k=k)
    state = fx.fit(fx.TrainState.create(mlp(), tx), fx.make_train_step(_mse),
                   fx.data.Batches((x, y), 2), callbacks=callbacks,
                   **settings, **evaluation, **saving)
    fx.predict(lambda state, x: state.apply(state.params, x), state,
               fx.data.Batches(_regression(6)[0], 2, shuffle=False), callbacks=[cb])
    return seen.seen


def _in_fit_order(trainer, steps_per_epoch):
    """The Trainer's sequence with fit's one difference: a save at the last step of an epoch
    its data ended comes after on_epoch_end (fit ends the epoch, then saves; the module
    docstring's table). An epoch a stop cuts short ends after the save in both."""
    out = list(trainer)
    for i in range(len(out) - 1):
        (a, s), (b, t) = out[i], out[i + 1]
        if (a, b) == ("on_save", "on_epoch_end") and s == t and s % steps_per_epoch == 0:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _has_accelerate():
    try:
        import accelerate  # noqa: F401  (transformers.Trainer needs it; fxtrain does not)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("run", sorted(RUNS))
def test_hooks_come_in_the_trainers_order(run, tmp_path):
    trainer_settings, fit_settings = RUNS[run]
    if _has_accelerate():  # the recorded sequence is what the installed Trainer does
        assert _trainer_run(trainer_settings) == TRAINER[run]
    per_epoch = 4 // fit_settings.get("accumulate", 1)  # optimizer steps
    assert _fit_run(fit_settings, tmp_path) == _in_fit_order(TRAINER[run], per_epoch)


def test_an_error_calls_no_more_hooks_as_in_the_trainer():
    seen = Sequence()

    def fail_at_2(state, event):
        if event.kind == "step_end" and event.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _fit(_state(), hf_callback(seen, log_every=1), fail_at_2, steps=4)
    assert seen.seen[-3:] == [("on_optimizer_step", 1), ("on_step_end", 2), ("on_log", 2)]
    # the Trainer's train() raises without on_epoch_end or on_train_end; so does fit's


def test_predict_calls_a_prediction_step_per_batch_then_on_predict():
    rec = Sequence()
    x = _regression(5)[0]  # batches of 2, 2 and 1
    fx.predict(lambda state, x: state.apply(state.params, x), _state(),
               fx.data.Batches(x, 2, shuffle=False, drop_last=False),
               callbacks=[hf_callback(rec)])  # a state fit never ran with it: no hf state
    assert rec.seen == [("on_prediction_step", 0)] * 3 + [("on_predict", 0)]


def test_several_evaluation_sets_are_named_as_the_trainer_names_an_eval_dataset_dict(tmp_path):
    """fit's ``val/loss`` and ``test/loss`` reach the callback as the Trainer's
    ``eval_val_loss`` and ``eval_test_loss``; ``metric_for_best_model="val_loss"`` ranks by the
    val set, and load_best_model_at_end accepts the manager ranking by ``val/loss``."""
    rec = Recorder()
    cb = hf_callback(rec, args={"metric_for_best_model": "val_loss"})
    state, _ = _begin(cb, _state(cb))
    metrics = {"val/loss": torch.tensor(0.5), "test/loss": torch.tensor(0.75)}
    state, _ = fold([cb], state, Event("eval_end", 2, 0, metrics))
    assert rec.metrics == [{"eval_val_loss": 0.5, "eval_test_loss": 0.75}]
    saved = fx.callbacks.callback_state(state, "hf_Recorder")["trainer_state"]
    assert saved["best_metric"] == pytest.approx(0.5)
    by_val = fx.checkpoint.CheckpointManager(tmp_path, keep_best=1, best_metric="val/loss")
    hf_callback(Recorder(), args={**BEST, "metric_for_best_model": "val_loss"},
                checkpoint=by_val)  # accepted
    with pytest.raises(ValueError, match=r"ranks checkpoints by 'test_loss'"):
        hf_callback(Recorder(), args={**BEST, "metric_for_best_model": "test_loss"},
                    checkpoint=by_val)
