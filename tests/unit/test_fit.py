"""``fx.fit``: events, controls, evaluation, resume, interruption and bad input."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import fxtrain as fx
from helpers import FakeManager, extra, mlp, reaped, sigint_back, xent

X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def setup(callbacks=(), dropout=0.1, tx=None):
    state = fx.TrainState.create(mlp((8, 16, 2), dropout=dropout), tx or fx.optim.adamw(1e-2),
                                 callbacks=callbacks)
    return state, fx.make_train_step(xent, callbacks=callbacks)


def recorder(log):
    def cb(state, event):
        log.append((event.kind, event.step, event.epoch))
    return cb


def test_events_arrive_in_order_with_evaluation_each_epoch():
    log = []
    state, step = setup()
    data = fx.data.Batches((X, Y), 32)  # 3 batches per epoch
    state = fx.fit(state, step, data, callbacks=[recorder(log)], max_epochs=2,
                   eval_step=fx.make_eval_step(xent), eval_data=fx.data.Batches((X, Y), 48, shuffle=False))
    kinds = [k for k, _, _ in log]
    epoch = ["epoch_begin"] + ["step_end"] * 3 + ["eval_begin", "eval_end", "epoch_end"]
    assert kinds == ["setup", "train_begin"] + epoch + epoch + ["train_end"]
    assert [s for k, s, _ in log if k == "step_end"] == [1, 2, 3, 4, 5, 6]
    assert [e for k, _, e in log if k == "epoch_end"] == [0, 1]
    assert int(state.step) == 6 and int(state.data.epoch) == 2


def test_train_begin_describes_the_run_and_train_end_says_why():
    seen = {}

    def cb(state, event):
        seen[event.kind] = event.metrics

    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 32), callbacks=[cb], max_steps=4, sync_every=2)
    assert seen["train_begin"] == {"max_steps": 4, "max_epochs": None, "steps_per_epoch": 3,
                                   "batch_size": 32, "eval_batches": None, "compiled": False,
                                   "sync_every": 2, "steps_per_call": 1}
    assert seen["train_end"] == {"reason": "max_steps"}


def test_eval_metrics_are_averaged_over_examples():
    got = {}
    state, step = setup()
    eval_data = fx.data.Batches((X[:50], Y[:50]), 16, shuffle=False, drop_last=False)  # 16,16,16,2

    def mean_x(state, batch):
        return {"mean_x0": batch[0][:, 0].mean(), "acc": fx.metrics.Accuracy.from_model_output(
            logits=state.apply(state.params, batch[0]), labels=batch[1])}

    def record(s, e):
        got.update(e.metrics, state=s)

    fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=1, eval_every=1,
           eval_step=fx.make_eval_step(mean_x), eval_data=eval_data,
           callbacks=[fx.callbacks.on("eval_end", record)])
    assert float(got["mean_x0"]) == pytest.approx(float(X[:50, 0].mean()), abs=1e-6)
    whole = fx.make_eval_step(  # the evaluated state's accuracy over all 50 examples at once
        lambda s, b: {"acc": (s.apply(s.params, b[0]).argmax(-1) == b[1]).float().mean()})(
        got["state"], (X[:50], Y[:50]))["acc"]
    assert float(got["acc"]) == pytest.approx(float(whole), abs=1e-6)


def test_resumed_fit_equals_an_uninterrupted_one():
    cbs = [fx.callbacks.early_stopping("loss", patience=100, event="step_end"),
           fx.callbacks.ema(0.9), fx.callbacks.grad_monitor(2)]
    host = [fx.callbacks.early_stopping("loss", patience=100, name="es_eval"),
            fx.callbacks.nan_guard()]
    kw = dict(callbacks=host, eval_step=fx.make_eval_step(xent), eval_every=4,
              eval_data=fx.data.Batches((X, Y), 48, shuffle=False))
    data = fx.data.Batches((X, Y), 16, seed=3)
    whole, step = setup(cbs)
    whole = fx.fit(whole, step, data, max_steps=17, **kw)
    half, step = setup(cbs)
    half = fx.fit(half, step, data, max_steps=7, **kw)
    half = fx.fit(half, step, fx.data.Batches((X, Y), 16, seed=3), max_steps=17, **kw)
    assert fx.tree_digest(half) == fx.tree_digest(whole)
    assert int(whole.step) == 17 and int(whole.data.epoch) == 2 and int(whole.data.index) == 5


def test_a_stop_inside_the_step_is_read_at_the_next_sync_and_skips_later_updates():
    def stop_at_7(state, event):
        return state, fx.Control(stop=event.step >= 7, skip=event.step > 7)

    state, step = setup([stop_at_7], dropout=0.0)
    end = fx.fit(state, step, fx.data.Batches((X, Y), 16), max_steps=50, sync_every=5)
    assert int(end.step) == 10  # read at step 10; steps 8-10 were no-ops
    ref, ref_step = setup(dropout=0.0)
    ref = fx.fit(ref, ref_step, fx.data.Batches((X, Y), 16), max_steps=7)
    assert all(torch.equal(end.params[k], ref.params[k]) for k in ref.params)


def test_early_stopping_ends_the_run_with_the_best_params_and_train_end():
    log = []
    es = fx.callbacks.early_stopping("loss", patience=1, restore_best=True)
    scripted = iter([0.5, 0.4, 0.9, 0.3])
    state, step = setup()
    end = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=100, eval_every=2,
                 eval_step=lambda s, b: {"loss": torch.tensor(next(scripted))},
                 eval_data=[None], callbacks=[es, recorder(log)])
    assert log[-1][0] == "train_end" and int(end.step) == 6
    assert int(end.callbacks["early_stopping"].best_step) == 4
    assert all(torch.equal(end.params[k], end.callbacks["early_stopping"].best_params[k])
               for k in end.params)


def test_the_time_budget_stops_the_run():
    clock = iter(range(1000))
    seen = []
    state, step = setup()
    end = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=100,
                 callbacks=[fx.callbacks.timer(5, time_fn=lambda: float(next(clock))),
                            fx.callbacks.on("train_end", lambda s, e: seen.append(e.metrics))])
    # one tick per event read by the timer: train_begin, steps, and the epoch_end at step 3
    assert int(end.step) == 4 and seen == [{"reason": "stopped",
                                            "stopped_by": "timer asked to stop"}]
    assert end.callbacks["timer"]["elapsed"] >= 5.0


def test_save_evaluate_and_log_controls_are_honoured():
    manager, evals, logged = FakeManager(), [], []

    def asks(state, event):
        if event.kind == "step_end":
            logged.append(bool(event.metrics.get("control/log", False)))
            return state, fx.Control(save=event.step == 3, evaluate=event.step == 5,
                                     log=event.step == 6)

    state, step = setup()
    fx.fit(state, step, fx.data.Batches((X, Y), 16), max_steps=8, checkpoint=manager,
           eval_step=lambda s, b: {"one": torch.tensor(1.0)}, eval_data=[None],
           eval_every=100, callbacks=[asks, fx.callbacks.on("eval_end", lambda s, e: evals.append(e.step))])
    assert manager.saved == [3, 8]  # on request, and the final state
    assert evals == [5]
    assert logged == [False] * 6 + [True, False]


def test_in_step_control_flags_reach_fit():
    def ask_save(state, event):
        return state, fx.Control(save=event.step == 4)

    manager = FakeManager()
    state, step = setup([ask_save])
    fx.fit(state, step, fx.data.Batches((X, Y), 16), max_steps=12, sync_every=5,
           checkpoint=manager)
    assert manager.saved == [5, 12]  # read at the next sync


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_host_callbacks_stop_takes_effect_at_its_step_bool_or_tensor(as_tensor):
    def stop_at_3(state, event):  # a host callback answering with the step's metrics
        if event.kind != "step_end":
            return state, fx.Control()
        asked = event.metrics["loss"] > -1.0 if as_tensor else True
        return state, fx.Control(stop=asked if event.step == 3 else False)

    state, step = setup(dropout=0.0)
    end = fx.fit(state, step, fx.data.Batches((X, Y), 16), max_steps=50, sync_every=50,
                 callbacks=[stop_at_3])
    assert int(end.step) == 3


def test_nan_guard_on_the_host_skips_a_poisoned_batch():
    good = (X[:16], Y[:16])
    bad = (torch.full_like(X[:16], float("nan")), Y[:16])
    state, step = setup(dropout=0.0)
    end = fx.fit(state, step, [good, bad, good], max_epochs=1,
                 callbacks=[fx.callbacks.nan_guard("skip")])
    ref, _ = setup(dropout=0.0)
    ref = fx.fit(ref, step, [good, good], max_epochs=1)
    assert int(end.callbacks["nan_guard"].skipped) == 1
    assert all(torch.equal(end.params[k], ref.params[k]) for k in ref.params)


def test_iterables_resume_by_skipping_and_iterators_end_by_themselves():
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 96, 16)]
    log = []
    state, step = setup(dropout=0.0)
    whole = fx.fit(state, step, batches, max_steps=9)
    part = fx.fit(setup(dropout=0.0)[0], step, batches, max_steps=4)
    part = fx.fit(part, step, batches, max_steps=9)
    assert fx.tree_digest(part) == fx.tree_digest(whole)
    end = fx.fit(setup()[0], step, iter(batches), callbacks=[recorder(log)])
    assert int(end.step) == 6 and log[-1][0] == "train_end"


def test_stateful_dataloader_keeps_its_state_in_the_state():
    sdl = extra("torchdata.stateful_dataloader")

    def loader():
        return sdl.StatefulDataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16,
                                      shuffle=True, generator=torch.Generator().manual_seed(1))

    state, step = setup(dropout=0.0)
    whole = fx.fit(state, step, loader(), max_steps=5)
    part = fx.fit(setup(dropout=0.0)[0], step, loader(), max_steps=3)
    assert isinstance(part.data, fx.data.LoaderPosition) and isinstance(part.data.loader, dict)
    part = fx.fit(part, step, loader(), max_steps=5)
    assert all(torch.equal(part.params[k], whole.params[k]) for k in whole.params)


def test_bad_input_gets_clear_errors():
    state, step = setup()
    data = fx.data.Batches((X, Y), 32)
    with pytest.raises(ValueError, match="pass max_steps or max_epochs"):
        fx.fit(state, step, data)
    with pytest.raises(ValueError, match="eval_step and eval_data go together"):
        fx.fit(state, step, data, max_steps=1, eval_step=fx.make_eval_step(xent))
    with pytest.raises(ValueError, match="sync_every must be a positive int"):
        fx.fit(state, step, data, max_steps=1, sync_every=0)
    with pytest.raises(TypeError, match="data must be fx.data.Batches"):
        fx.fit(state, step, 42, max_steps=1)
    with pytest.raises(KeyError, match=r"'val_loss' is not in the eval_end metrics; available: \['accuracy', 'loss'\]"):
        fx.fit(state, step, data, max_steps=2, eval_every=1, eval_step=fx.make_eval_step(xent),
               eval_data=data, callbacks=[fx.callbacks.early_stopping("val_loss")])


def test_fx_evaluate_averages_over_examples_across_uneven_batches():
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1))
    eval_step = fx.make_eval_step(xent)
    got = fx.evaluate(eval_step, state, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])])
    whole = eval_step(state, (x, y))
    torch.testing.assert_close(got["loss"], whole["loss"])


def test_fit_initialises_the_states_of_the_steps_own_callbacks():
    """In-step callbacks are listed once, in make_train_step: fit adds their missing states (a
    state made without them works), compiled or not, and reports a compiled step as such."""
    in_step = [fx.callbacks.ema(0.9), fx.callbacks.nan_guard("skip")]
    plans = []

    def plan(state, event):
        if event.kind == "train_begin":
            plans.append(event.metrics["compiled"])

    for compiled in (False, True):
        state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adamw(1e-2))
        assert state.callbacks is None
        step = fx.make_train_step(xent, callbacks=in_step)
        if compiled:
            step = torch.compile(step, fullgraph=True, backend="eager")
        state = fx.fit(state, step, fx.data.Batches((X, Y), 32), max_steps=4, callbacks=[plan])
        assert set(state.callbacks) == {"ema", "nan_guard"}
        assert int(state.step) == 4 and int(state.callbacks["nan_guard"].skipped) == 0
    assert plans == [False, True]
    with pytest.raises(KeyError, match="no callback state named 'ema'"):  # own loop: init first
        fx.make_train_step(xent, callbacks=in_step)(
            fx.TrainState.create(mlp((8, 16, 2)), fx.optim.adamw(1e-2)), (X[:32], Y[:32]))


def test_batches_go_to_the_states_device_and_a_step_names_both_devices(monkeypatch):
    """fit and evaluate move each batch to the state's device; a step given a batch on another
    device says which tensor is where. (No second device here: the state's is faked as meta.)"""
    moved = []
    real = fx.to_device  # before the patch: fxtrain binds its lazy names once, at first use
    state, step = setup()

    def recording(batch, device):
        moved.append(str(device))
        return real(batch, device)

    monkeypatch.setattr("fxtrain.data._feed.to_device", recording)
    monkeypatch.setattr("fxtrain.loop._evaluation.to_device", recording)
    data = fx.data.Batches((X, Y), 32)
    fx.fit(state, step, data, max_steps=3, eval_step=fx.make_eval_step(xent), eval_data=[(X, Y)],
           eval_every=3)
    assert moved == ["cpu"] * 4  # three steps and one eval batch
    batch = (X[:4].to("meta"), Y[:4].to("meta"))
    with pytest.raises(ValueError, match=r"batch's \[0\] is on meta, the state on cpu"):
        step(fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1)), batch)
    same = (X[:4], Y[:4])
    assert fx.to_device(same, "cpu") is same  # nothing to move: the same value


def _interrupting(at, times):
    """Last in an optimizer's chain: sends this process SIGINT ``times`` times in the update
    that makes step ``at``, after Adam wrote its moments into the donated state."""
    def update(grads, count, params=None):
        if int(count) == at - 1:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return grads, count + 1
    return fx.optim.GradientTransformation(lambda params: torch.zeros((), dtype=torch.int64),
                                           update)


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever runs the suite."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_ctrl_c_inside_a_donating_step_never_saves_a_half_written_state(tmp_path, ctrl_c, times):
    """fit donates each state to its step, which writes Adam's moments and then the parameters
    into it. A Ctrl-C there is held until the step ends: fit saves that step and hands it back,
    as an uninterrupted run of as many steps has it. A second Ctrl-C stops at once: nothing is
    saved and the state the step was given is given up, so the checkpoints before stay whole."""
    data = fx.data.Batches((X, Y), 16, seed=0)
    tx = lambda at: fx.optim.chain(fx.optim.adamw(1e-2), _interrupting(at, times))  # noqa: E731
    manager = fx.checkpoint.CheckpointManager(tmp_path / "ckpt", keep_latest=10,
                                              async_save=False)
    state, step = setup(dropout=0.0, tx=tx(5))
    with pytest.raises(fx.Interrupted) as raised:
        if times == 2:
            with pytest.warns(UserWarning, match="stopped inside the step after step 4.*given up"):
                fx.fit(state, step, data, max_steps=10, checkpoint=manager,
                       callbacks=[fx.callbacks.checkpoint_policy(every=2)])
        else:
            fx.fit(state, step, data, max_steps=10, checkpoint=manager,
                   callbacks=[fx.callbacks.checkpoint_policy(every=2)])
    saved = 5 if times == 1 else 4
    assert manager.latest_step() == saved
    reference, step = setup(dropout=0.0, tx=tx(0))  # the same chain, never interrupting
    reference = fx.fit(reference, step, data, max_steps=saved)
    assert fx.tree_digest(manager.restore(like=reference)) == fx.tree_digest(reference)
    if times == 1:
        assert fx.tree_digest(raised.value.state) == fx.tree_digest(reference)
    else:
        with pytest.raises(fx.DonatedError, match="donated to a train step"):
            fx.tree_digest(raised.value.state)


def test_a_second_ctrl_c_still_lets_the_save_under_way_finish(ctrl_c):
    """A second Ctrl-C gives the step's state up and saves nothing of it, but the save of an
    earlier step, which an async manager may still be writing, is waited for before fit
    raises: the process may exit right after, and that checkpoint must not be left half
    written."""
    class Recording(FakeManager):
        def __init__(self):
            super().__init__()
            self.calls = []

        def save(self, state, metrics=None, force=False):
            self.calls.append(f"save {int(state.step)}")
            return super().save(state, metrics, force)

        def wait(self):
            self.calls.append("wait")

    manager = Recording()
    tx = fx.optim.chain(fx.optim.adamw(1e-2), _interrupting(5, 2))
    state, step = setup(dropout=0.0, tx=tx)
    with pytest.raises(fx.Interrupted), pytest.warns(UserWarning, match="given up"):
        fx.fit(state, step, fx.data.Batches((X, Y), 16, seed=0), max_steps=10,
               checkpoint=manager, callbacks=[fx.callbacks.checkpoint_policy(every=2)])
    assert manager.saved == [2, 4] and manager.calls[-1] == "wait"


def test_a_ctrl_c_between_steps_stops_at_once_with_the_state_whole(tmp_path, ctrl_c,
                                                                   monkeypatch):
    """fit installs its holding handler once (not around every step) and puts Python's own
    back when it ends. A Ctrl-C that lands between steps (a host callback at step 4's end
    sends it) raises at once, as Python's handler does, and finds the state whole: fit saves
    it, sends train_end and hands it back, as for a first Ctrl-C, and gives nothing up."""
    install, installs = signal.signal, []

    def counting(signum, handler):
        if signum == signal.SIGINT and handler is not signal.default_int_handler:
            installs.append(handler)
        return install(signum, handler)
    monkeypatch.setattr(signal, "signal", counting)

    def ctrl_c_after_step_4(state, event):
        if event.kind == "step_end" and int(state.step) == 4:
            signal.raise_signal(signal.SIGINT)
        return state, fx.Control()

    data = fx.data.Batches((X, Y), 16, seed=0)
    manager = fx.checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False)
    log = []
    state, step = setup(dropout=0.0)
    with pytest.raises(fx.Interrupted) as raised:
        fx.fit(state, step, data, max_steps=10, checkpoint=manager,
               callbacks=[recorder(log), ctrl_c_after_step_4])
    assert len(installs) == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    reference, step = setup(dropout=0.0)
    reference = fx.fit(reference, step, data, max_steps=4)
    assert fx.tree_digest(raised.value.state) == fx.tree_digest(reference)
    assert manager.latest_step() == 4
    assert fx.tree_digest(manager.restore(like=reference)) == fx.tree_digest(reference)
    assert log[-1] == ("train_end", 4, 0)
