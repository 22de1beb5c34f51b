import glob
import json
import logging
import os

import pytest
import torch
from helpers import classification_batch, mlp, xent

import fxtrain as fx
from fxtrain.callbacks.core import Control, Event, fold
from fxtrain.debug import explain_step, find_graph_breaks, profiler


def _state():
    return fx.TrainState.create(mlp(), fx.optim.sgd(0.1))


def _traces(logdir):
    return sorted(glob.glob(os.path.join(str(logdir), "*.pt.trace.json")))


def _run_profiled(cb, steps):
    """train_begin, ``steps`` steps of real tensor work, train_end."""
    state = _state()
    step = fx.make_train_step(xent)
    batch = classification_batch()
    state, _ = fold([cb], state, Event("train_begin", 0, 0, {}))
    for i in range(steps):
        state, metrics = step(state, batch)
        state, control = fold([cb], state, Event("step_end", i + 1, 0, metrics))
        assert control == Control()
    state, _ = fold([cb], state, Event("train_end", steps, 0, {"reason": "max_steps"}))
    return state


def test_profiler_writes_one_trace_per_window(tmp_path, caplog):
    logdir = tmp_path / "prof"
    cb = profiler(logdir, wait=1, warmup=1, active=2, repeat=1)
    assert cb.host and cb.init is None
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        _run_profiled(cb, steps=6)
    traces = _traces(logdir)
    assert len(traces) == 1
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names  # the active steps, after wait+warmup
    assert "ProfilerStep#4" not in names
    assert any(traces[0] in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("ignore:.*acc_events")
def test_profiler_repeats_windows(tmp_path):
    _run_profiled(profiler(tmp_path, wait=0, warmup=1, active=1, repeat=2), steps=6)
    assert len(_traces(tmp_path)) == 2


def test_profiler_writes_partial_window_at_train_end(tmp_path):
    _run_profiled(profiler(tmp_path, wait=1, warmup=1, active=5), steps=3)
    assert len(_traces(tmp_path)) == 1


def test_profiler_writes_nothing_when_training_ends_while_waiting(tmp_path):
    _run_profiled(profiler(tmp_path, wait=5, warmup=1, active=2), steps=3)
    assert _traces(tmp_path) == []


def test_profiler_clear_error_for_uncreatable_logdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cb = profiler(blocker / "prof")
    with pytest.raises(OSError, match="cannot create logdir"):
        fold([cb], _state(), Event("train_begin", 0, 0, {}))


@pytest.mark.parametrize("kw", [{"active": 0}, {"wait": -1}, {"warmup": 1.5}, {"repeat": -2}])
def test_profiler_rejects_bad_schedule(tmp_path, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        profiler(tmp_path, **kw)


_host_reads = []


def _breaking_loss(state, params, batch):
    loss, aux = xent(state, params, batch)
    _host_reads.append(loss.item())  # a host read: Dynamo must break the graph here
    return loss, aux


def _drive(cb, loss_fn, shapes=(16, 16)):
    """train_begin, one compiled step per batch size in ``shapes``, train_end."""
    state = _state()
    # backend="eager" trips a Dynamo assertion on the graph break under torch.func.grad
    step = torch.compile(fx.make_train_step(loss_fn), backend="aot_eager")
    state, _ = fold([cb], state, Event("train_begin", 0, 0, {"compiled": True}))
    for i, n in enumerate(shapes):
        state, metrics = step(state, classification_batch(n=n))
        state, _ = fold([cb], state, Event("step_end", i + 1, 0, metrics))
    fold([cb], state, Event("train_end", len(shapes), 0, {"reason": "max_steps"}))


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fxtrain"]


def test_find_graph_breaks_reports_breaks_with_reason(caplog):
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        _drive(find_graph_breaks(), _breaking_loss)
    first = _messages(caplog)[0]
    assert "graph break" in first and "item()" in first
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fxtrain"]
    assert warned and "first step" in warned[0].getMessage()


def test_find_graph_breaks_quiet_for_a_clean_step(caplog):
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        _drive(find_graph_breaks(raise_on_break=True), xent)
    messages = _messages(caplog)
    assert "no graph breaks" in messages[0]
    assert "0 graphs compiled after the first step" in messages[1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "fxtrain"]


def test_find_graph_breaks_raises_when_asked():
    with pytest.raises(RuntimeError, match="graph break.*item"):
        _drive(find_graph_breaks(raise_on_break=True), _breaking_loss)


def test_find_graph_breaks_counts_recompiles(caplog):
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        _drive(find_graph_breaks(), xent, shapes=(16, 12))  # a new batch size recompiles
    last = _messages(caplog)[-1]
    assert "after the first step" in last and not last.startswith("find_graph_breaks: 0 ")
    assert [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fxtrain"]


def test_explain_step_finds_the_break_and_its_line():
    report = explain_step(fx.make_train_step(_breaking_loss), _state(), classification_batch())
    assert report.graph_count >= 2 and report.break_count >= 1
    assert any("item()" in r and "test_debug.py" in r for r in report.reasons)
    assert "graph break" in str(report)


def test_explain_step_clean_step_is_one_graph():
    report = explain_step(fx.make_train_step(xent), _state(), classification_batch())
    assert (report.graph_count, report.break_count, report.reasons) == (1, 0, ())
