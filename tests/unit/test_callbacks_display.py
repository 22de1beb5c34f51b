"""progress_bar and summary: what they show, driven by fold with synthetic events."""

import io
import re

import pytest
import torch
from helpers import convnet, mlp

import fxtrain as fx
from fxtrain.callbacks.core import Event, fold
from fxtrain.callbacks.progress import progress_bar
from fxtrain.callbacks.summary import describe_optimizer, parameter_counts, summary


@pytest.fixture
def state():
    return fx.TrainState.create(mlp(), fx.optim.adamw(1e-3))


def begin(step=0, epoch=0, **info):
    metrics = {"max_steps": None, "max_epochs": None, "steps_per_epoch": None,
               "batch_size": None, "eval_batches": None, "compiled": False, "sync_every": 50}
    return Event("train_begin", step, epoch, {**metrics, **info})


def run_steps(callbacks, state, steps, metrics_at, epoch=0):
    for step in steps:
        state, _ = fold(callbacks, state, Event("step_end", step, epoch, metrics_at(step)))
    return state


def end(step, reason="max_steps"):
    return Event("train_end", step, 0, {"reason": reason})


def last_line(text):
    return re.split(r"[\r\n]", text.rstrip())[-1]


# progress_bar ------------------------------------------------------------------------------


def test_bar_counts_to_max_steps_and_shows_the_last_loss(state):
    out = io.StringIO()
    cbs = [progress_bar(smoothing=0.0, refresh_every=5, min_interval=0, file=out)]
    fold(cbs, state, begin(max_steps=20))
    run_steps(cbs, state, range(1, 21), lambda s: {"loss": torch.tensor(1.0 / s)})
    fold(cbs, state, end(20))
    line = last_line(out.getvalue())
    assert "20/20" in line
    assert "loss=0.05" in line


def test_postfix_is_an_ema_over_the_refreshed_steps(state):
    out = io.StringIO()
    cbs = [progress_bar(smoothing=0.5, refresh_every=4, min_interval=0, file=out)]
    fold(cbs, state, begin(max_steps=8))
    run_steps(cbs, state, range(1, 9), lambda s: {"loss": torch.tensor(float(s))})
    fold(cbs, state, end(8))
    ema = 1.0  # refreshes at the first step, then at steps 4 and 8
    for value in (4.0, 8.0):
        ema = 0.5 * ema + 0.5 * value
    assert f"loss={ema:.4g}" in last_line(out.getvalue())


def test_train_end_shows_the_metrics_of_the_last_step(state):
    out = io.StringIO()
    cbs = [progress_bar(smoothing=0.0, refresh_every=10, min_interval=0, file=out)]
    fold(cbs, state, begin(max_steps=100))
    run_steps(cbs, state, range(1, 16), lambda s: {"loss": torch.tensor(float(s))})
    fold(cbs, state, end(15, "data_exhausted"))  # the last refresh was at step 10
    assert "loss=15" in last_line(out.getvalue())


def test_several_metrics_are_shown(state):
    out = io.StringIO()
    cbs = [progress_bar(["loss", "accuracy"], smoothing=0.0, refresh_every=2, min_interval=0, file=out)]
    fold(cbs, state, begin(max_steps=4))
    run_steps(cbs, state, range(1, 5),
              lambda s: {"loss": torch.tensor(0.5), "accuracy": torch.tensor(0.75)})
    fold(cbs, state, end(4))
    assert "loss=0.5, accuracy=0.75" in last_line(out.getvalue())


def test_bar_resumes_at_the_events_step(state):
    out = io.StringIO()
    cbs = [progress_bar(file=out)]
    fold(cbs, state, begin(step=30, max_steps=50))
    assert "30/50" in out.getvalue()
    run_steps(cbs, state, range(31, 51), lambda s: {"loss": torch.tensor(0.1)})
    fold(cbs, state, end(50))
    assert "50/50" in last_line(out.getvalue())


def test_total_comes_from_epochs_and_the_epoch_bar_advances(state):
    out = io.StringIO()
    cbs = [progress_bar(file=out, min_interval=0)]  # every epoch drawn, however fast
    fold(cbs, state, begin(max_epochs=3, steps_per_epoch=4))
    for epoch in range(3):
        steps = range(4 * epoch + 1, 4 * epoch + 5)
        run_steps(cbs, state, steps, lambda s: {"loss": torch.tensor(0.1)}, epoch=epoch)
        fold(cbs, state, Event("epoch_end", 4 * epoch + 4, epoch, None))
    text = out.getvalue()
    assert all(f"epoch {e}/3" in text for e in (1, 2, 3)) and "epoch 4/3" not in text
    fold(cbs, state, end(12, "max_epochs"))
    assert "12/12" in last_line(out.getvalue())


@pytest.mark.parametrize("min_interval", [0, 3600])
def test_short_epochs_of_fast_steps_start_the_epoch_bar_over_when_it_next_moves(state,
                                                                                 min_interval):
    # a reset redraws the bar: within min_interval of the last draw it waits for the next move
    out = io.StringIO()
    cbs = [progress_bar(file=out, min_interval=min_interval)]
    fold(cbs, state, begin(max_epochs=10, steps_per_epoch=4))
    for epoch in range(9):
        run_steps(cbs, state, range(4 * epoch + 1, 4 * epoch + 5),
                  lambda s: {"loss": torch.tensor(0.1)}, epoch=epoch)
        fold(cbs, state, Event("epoch_end", 4 * epoch + 4, epoch, None))
    run_steps(cbs, state, range(37, 39), lambda s: {"loss": torch.tensor(0.1)}, epoch=9)
    text = out.getvalue()
    drawn = {e for e in range(1, 11) if f"epoch {e}/10" in text}
    assert drawn == (set(range(1, 11)) if min_interval == 0 else {1})
    fold(cbs, state, end(38, "max_steps"))
    text = out.getvalue()  # the end draws the epoch it stopped in
    assert "epoch 10/10" in text and "epoch 11/10" not in text
    assert "38/40" in last_line(text)


def test_missing_metric_is_a_clear_error(state):
    cbs = [progress_bar("acc", file=io.StringIO())]
    fold(cbs, state, begin(max_steps=10))
    with pytest.raises(ValueError, match=r"'acc'.*available.*'accuracy', 'loss'"):
        run_steps(cbs, state, [1], lambda s: {"loss": torch.tensor(1.0),
                                              "accuracy": torch.tensor(0.5)})


def test_steps_between_refreshes_do_not_read_the_metrics(state):
    cbs = [progress_bar(refresh_every=10, min_interval=0, file=io.StringIO())]
    fold(cbs, state, begin(max_steps=10))
    run_steps(cbs, state, [1], lambda s: {"loss": torch.tensor(1.0)})
    run_steps(cbs, state, range(2, 10), lambda s: {})  # no "loss": fine, nothing is read
    with pytest.raises(ValueError, match="no metric 'loss'"):
        run_steps(cbs, state, [10], lambda s: {})


@pytest.mark.parametrize("metrics, line", [
    ({"loss": torch.tensor(0.25), "accuracy": torch.tensor(0.75)},
     "eval @ step 10: loss=0.25 accuracy=0.75"),
    ({"loss": torch.tensor(0.25), "confusion": torch.eye(3)},  # a matrix is left out
     "eval @ step 10: loss=0.25\n")])
def test_eval_end_writes_a_line_with_the_eval_metrics(state, metrics, line):
    out = io.StringIO()
    cbs = [progress_bar(file=out)]
    fold(cbs, state, begin(max_steps=10))
    fold(cbs, state, Event("eval_end", 10, 0, metrics))
    assert line in out.getvalue()


def test_early_end_says_why(state):
    out = io.StringIO()
    cbs = [progress_bar(file=out)]
    fold(cbs, state, begin(max_steps=100))
    run_steps(cbs, state, range(1, 8), lambda s: {"loss": torch.tensor(0.1)})
    fold(cbs, state, end(7, "stopped"))
    text = out.getvalue()
    assert "training ended at step 7: stopped" in text
    assert "7/100" in last_line(text)


def test_bar_is_a_stateless_host_callback(state):
    cb = progress_bar(file=io.StringIO())
    assert cb.host and cb.init is None
    new, control = fold([cb], state, begin(max_steps=3))
    assert new is state and not any((control.stop, control.save, control.evaluate))


def test_nothing_is_shown_on_other_ranks(state, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    out = io.StringIO()
    cbs = [progress_bar(file=out), summary(file=out)]
    fold(cbs, state, begin(max_steps=5))
    run_steps(cbs, state, range(1, 6), lambda s: {})
    fold(cbs, state, Event("eval_end", 5, 0, {"loss": torch.tensor(0.5)}))
    fold(cbs, state, end(5))
    assert out.getvalue() == ""


@pytest.mark.parametrize("kwargs, match", [
    ({"smoothing": 1.0}, "smoothing"),
    ({"smoothing": -0.1}, "smoothing"),
    ({"refresh_every": 0}, "refresh_every"),
    ({"metric": []}, "metric"),
    ({"metric": ["loss", 3]}, "metric"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        progress_bar(**kwargs)


# summary -----------------------------------------------------------------------------------


def table_value(text, key):
    """The cell after ``key`` in the rich table row that holds it."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if key in cells:
            return cells[cells.index(key) + 1]
    raise AssertionError(f"no row {key!r} in\n{text}")


def show_summary(state, event):
    out = io.StringIO()
    new, _ = fold([summary(file=out)], state, event)
    assert new is state
    return out.getvalue()


def test_summary_counts_the_parameters_of_a_known_mlp(state):
    text = show_summary(state, begin())
    # Linear(8, 16) + Linear(16, 4): 8 * 16 + 16 + 16 * 4 + 4 = 212 float32 numbers
    assert table_value(text, "model") == "Sequential"
    assert table_value(text, "parameters") == "212"
    assert table_value(text, "trainable") == "212"
    assert table_value(text, "frozen") == "0"
    assert table_value(text, "parameter memory") == "848 B"
    assert re.search(r"│ 0\s+│ Linear\s+│\s+144 │\s+144 │", text)
    assert re.search(r"│ 2\s+│ Linear\s+│\s+68 │\s+68 │", text)


def test_summary_tells_frozen_parameters_from_buffers():
    model = convnet()
    model[0].requires_grad_(False)  # Conv2d(1, 4, 3): 36 + 4 frozen parameters
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    counts = parameter_counts(state)
    # BatchNorm2d(4): 8 parameters, 9 buffers (running mean, variance, batch count)
    assert counts["frozen"] == 40 and counts["buffers"] == 9
    assert counts["trainable"] == 8 + 144 * 10 + 10
    assert counts["total"] == counts["trainable"] + 40
    text = show_summary(state, begin())
    assert table_value(text, "frozen") == "40"
    assert table_value(text, "buffers") == "9"
    assert table_value(text, "parameters") == f"{counts['total']:,}"


def test_summary_shows_the_optimizer_and_learning_rate(state):
    text = show_summary(state, begin())
    assert table_value(text, "optimizer") == "chain(scale_by_adam, scale_by_learning_rate)"
    assert table_value(text, "learning rate") == "0.001"
    injected = fx.TrainState.create(mlp(), fx.optim.inject_hyperparams(fx.optim.sgd)(
        learning_rate=0.05))
    text = show_summary(injected, begin())
    assert table_value(text, "learning rate") == "0.05"
    assert table_value(text, "optimizer").startswith("inject_hyperparams(")


def test_describe_optimizer_nests_wrappers():
    params = {"w": torch.zeros(3)}
    tx = fx.optim.multi_steps(fx.optim.chain(fx.optim.clip_by_global_norm(1.0),
                                             fx.optim.sgd(0.1, momentum=0.9)), 2)
    expected = "multi_steps(chain(trace, scale_by_learning_rate))"
    assert describe_optimizer(tx.init(params)) == expected


def test_summary_shows_the_run_settings_and_resume_point(state):
    event = begin(step=120, epoch=2, max_steps=1000, steps_per_epoch=50, batch_size=16,
                  compiled=True)
    text = show_summary(state, event)
    assert table_value(text, "max steps") == "1,000"
    assert table_value(text, "max epochs") == "-"
    assert table_value(text, "steps per epoch") == "50"
    assert table_value(text, "batch size") == "16"
    assert table_value(text, "compiled") == "True"
    assert table_value(text, "start step") == "120"
    assert table_value(text, "start epoch") == "2"
    assert table_value(text, "device") == "cpu"
    assert table_value(text, "dtype") == "float32"
    assert table_value(text, "world size") == "1"


def test_summary_reads_the_world_size(state, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    assert table_value(show_summary(state, begin()), "world size") == "4"


def test_summary_only_reacts_to_train_begin(state):
    out = io.StringIO()
    cb = summary(file=out)
    assert cb.host and cb.init is None
    fold([cb], state, Event("step_end", 1, 0, {"loss": torch.tensor(1.0)}))
    fold([cb], state, end(1))
    assert out.getvalue() == ""


def test_fast_steps_read_the_metrics_at_most_once_per_interval(monkeypatch):
    import fxtrain.callbacks.progress as progress
    reads, now = [], [0.0]
    real = progress.read_floats
    monkeypatch.setattr(progress, "read_floats", lambda values: reads.append(1) or real(values))
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    cb = progress_bar(refresh_every=1, min_interval=1.0, file=io.StringIO())
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    fold([cb], state, Event("train_begin", 0, 0, {"max_steps": 100}))
    for step in range(1, 21):
        now[0] = step * 0.25  # four steps a second
        fold([cb], state, Event("step_end", step, 0, {"loss": 1.0}))
    assert len(reads) == 5  # steps 1, 5, 9, 13, 17: one read per second of steps
