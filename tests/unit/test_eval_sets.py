"""Several evaluation sets in fit (``eval_data={"val": ..., "test": ...}``): per-set metric names
in the events and on disk, monitors that name a set, an exact resume, and the refusals.

The model is one weight ``w`` (``y = w x``) trained by SGD towards ``y = x`` from ``w = 0``:
``w_t = 1 - 0.8^t`` at x = 1. A set with targets ``x`` ("toward") sees its loss fall at every
step, a set with targets ``-x`` ("away") sees it rise, so early stopping on one set stops where
its patience says while the other set improves.
"""

import pytest
import torch
from torch import nn

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from fxtrain.cli import main
from helpers_apps import _project
from helpers_logging import read_tensorboard

ONES = torch.ones(4, 1)
TOWARD, AWAY = [(ONES, ONES)], [(ONES, -ONES)]


def mse(state, params, batch):
    x, y = batch
    return ((state.apply(params, x) - y) ** 2).mean()


def linear(lr=0.1, **kwargs):
    """``y = w x`` with ``w = 0``, and its train step: each step moves w 20% of the way to 1."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return fx.TrainState.create(model, fx.optim.sgd(lr), **kwargs), fx.make_train_step(mse)


def train_data():
    return fx.data.Batches((ONES, ONES), 4)


def fit(eval_data, steps, callbacks=(), eval_every=1, eval_step=None, **kwargs):
    state, step = linear()
    return fx.fit(state, step, train_data(), max_steps=steps, callbacks=callbacks,
                  eval_step=eval_step or fx.make_eval_step(mse), eval_data=eval_data,
                  eval_every=eval_every, progress=False, **kwargs)


def events(kinds=("train_begin", "eval_end", "epoch_end")):
    seen = []
    return seen, lambda state, event: seen.append(event) if event.kind in kinds else None


def expected_losses(step):
    """Each set's loss after ``step`` steps, computed as the step does (float32)."""
    w = torch.zeros(())
    for _ in range(step):
        w = w - 0.1 * (2 * (w - 1))
    return float((w - 1) ** 2), float((w + 1) ** 2)


# ---- names ---------------------------------------------------------------------------------------

def test_each_set_evaluates_at_every_boundary_into_one_event_named_by_set():
    seen, record = events()
    fit({"val": TOWARD, "test": AWAY}, 4, [record], eval_every=2)
    begin, *evals = [e for e in seen if e.kind != "epoch_end"]
    assert begin.metrics["eval_sets"] == ["val", "test"] and begin.metrics["eval_batches"] == 2
    assert [e.step for e in evals] == [2, 4]
    for e in evals:
        assert list(e.metrics) == ["val/loss", "test/loss"]  # in the dict's order
        assert [float(v) for v in e.metrics.values()] == pytest.approx(
            expected_losses(e.step), rel=1e-6)
    epoch_end = [e for e in seen if e.kind == "epoch_end"][-1]
    assert {"eval/val/loss", "eval/test/loss"} <= set(epoch_end.metrics)


def test_each_sets_batches_are_named_by_set():
    """eval_batch events (for a callback that names them) carry their set's name, as its
    eval_end metrics do; one set's keep the bare names."""
    batches = []

    def record(state, event):
        batches.append(list(event.metrics))
        return state, fx.Control()

    cb = fx.callbacks.Callback("batches", None, record, kinds=("eval_batch",), host=True)
    fit({"val": TOWARD, "test": AWAY}, 1, [cb])
    assert batches == [["val/loss"], ["test/loss"]]
    batches.clear()
    fit(TOWARD, 1, [cb])
    assert batches == [["loss"]]


def test_one_set_keeps_its_names():
    seen, record = events()
    fit(TOWARD, 2, [record])
    assert "eval_sets" not in seen[0].metrics and seen[0].metrics["eval_batches"] == 1
    assert [list(e.metrics) for e in seen if e.kind == "eval_end"] == [["loss"], ["loss"]]
    assert "eval/loss" in [e for e in seen if e.kind == "epoch_end"][-1].metrics


def test_writers_on_disk_name_each_sets_metrics(tmp_path):
    tb = fx.logging.TensorBoardWriter(tmp_path / "tb")
    jsonl = fx.logging.JsonlWriter(tmp_path / "metrics.jsonl")
    fit({"val": TOWARD, "test": AWAY}, 4, [fx.callbacks.log_metrics(tb, every=2),
                                           fx.callbacks.log_metrics(jsonl, every=2)],
        eval_every=2)
    tb.close()
    jsonl.close()
    acc = read_tensorboard(tmp_path / "tb")
    assert not any(tag == "eval/loss" for tag in acc.Tags()["scalars"])
    lines = [line for line in fx.logging.read_jsonl(tmp_path / "metrics.jsonl")
             if any(k.startswith("eval/") for k in line["values"])]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        val, test = expected_losses(line["step"])
        assert line["values"] == pytest.approx({"eval/val/loss": val, "eval/test/loss": test},
                                               rel=1e-6)
    for tag, i in (("eval/val/loss", 0), ("eval/test/loss", 1)):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)] == [
            (s, expected_losses(s)[i]) for s in (2, 4)]


def test_one_set_writes_eval_loss_as_before(tmp_path):
    jsonl = fx.logging.JsonlWriter(tmp_path / "metrics.jsonl")
    fit(TOWARD, 2, [fx.callbacks.log_metrics(jsonl, every=2)], eval_every=2)
    jsonl.close()
    written = [sorted(line["values"]) for line in fx.logging.read_jsonl(tmp_path /
                                                                        "metrics.jsonl")]
    assert ["eval/loss"] in written


def test_an_eval_step_per_set():
    seen, record = events(("eval_end",))
    double = fx.make_eval_step(lambda state, params, batch: {"loss2": 2 * mse(state, params,
                                                                            batch)})
    fit({"val": TOWARD, "test": AWAY}, 1, [record],
        eval_step={"test": double, "val": fx.make_eval_step(mse)})  # the sets run in eval_data's order
    val, test = expected_losses(1)
    assert list(seen[0].metrics) == ["val/loss", "test/loss2"]
    assert {k: float(v) for k, v in seen[0].metrics.items()} == pytest.approx(
        {"val/loss": val, "test/loss2": 2 * test}, rel=1e-6)


# ---- monitors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("worse", ["val", "test"])
def test_early_stopping_on_the_set_that_gets_worse_stops_at_its_patience(worse):
    better = {"val": "test", "test": "val"}[worse]
    stoppers = [fx.callbacks.early_stopping(f"{s}/loss", patience=3, name=f"es_{s}")
                for s in ("val", "test")]
    state = fit({worse: AWAY, better: TOWARD}, 40, stoppers, eval_every=2)
    # evaluations at 2, 4, 6, 8: the best at 2, three without improvement, stop at 8
    assert int(state.step) == 8
    gave_up, going = state.callbacks[f"es_{worse}"], state.callbacks[f"es_{better}"]
    assert (bool(gave_up.stopped), int(gave_up.best_step), int(gave_up.wait)) == (True, 2, 3)
    assert (bool(going.stopped), int(going.best_step), int(going.wait)) == (False, 8, 0)


def test_early_stopping_on_the_set_that_improves_runs_to_the_end():
    stop = fx.callbacks.early_stopping("val/loss", patience=1)
    state = fit({"val": TOWARD, "test": AWAY}, 6, [stop], eval_every=2)
    assert int(state.step) == 6 and int(state.callbacks["early_stopping"].best_step) == 6


@pytest.mark.parametrize("monitor,said", [
    ("tst/loss", r"monitor 'tst/loss' names no evaluation set.*\['val', 'test'\]"),
    ("loss", r"monitor 'loss' names no evaluation set.*\['val', 'test'\].*'val/loss'"),
    ("eval/test/loss", r"\['val', 'test'\].*the writers add it\): monitor 'test/loss'"),
])
@pytest.mark.parametrize("make", [
    lambda m: fx.callbacks.early_stopping(m),
    lambda m: fx.callbacks.checkpoint_policy(monitor=m)], ids=["early_stopping", "policy"])
def test_a_monitor_naming_no_set_is_refused_before_training(monitor, said, make):
    seen, record = events(("step_end",))
    with pytest.raises(ValueError, match=said):
        fit({"val": TOWARD, "test": AWAY}, 4, [make(monitor), record])
    assert seen == []


def test_epoch_and_plateau_monitors_naming_no_set_are_refused_before_training():
    """early_stopping on epoch_end reads the epoch's last evaluation as eval/<set>/<metric>,
    and reduce_lr_on_plateau reads eval_end's names: both refused at train_begin when the set
    is none of fit's; a training metric on epoch_end is not an evaluation's, and passes."""
    seen, record = events(("step_end",))
    with pytest.raises(ValueError, match=r"monitor 'tst/loss' names no evaluation set"):
        fit({"val": TOWARD, "test": AWAY}, 4, [
            fx.callbacks.early_stopping("eval/tst/loss", event="epoch_end"), record])
    model = nn.Linear(1, 1, bias=False)
    state = fx.TrainState.create(
        model, fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=0.1))
    with pytest.raises(ValueError, match=r"reduce_lr_on_plateau: monitor 'loss' names no "
                                         r"evaluation set.*\['val', 'test'\]"):
        fx.fit(state, fx.make_train_step(mse), train_data(), max_steps=4,
               eval_step=fx.make_eval_step(mse), eval_data={"val": TOWARD, "test": AWAY},
               callbacks=[fx.callbacks.reduce_lr_on_plateau("loss"), record], progress=False)
    assert seen == []
    fit({"val": TOWARD, "test": AWAY}, 2, [
        fx.callbacks.early_stopping("loss", event="epoch_end"),
        fx.callbacks.early_stopping("eval/val/loss", event="epoch_end", name="es_val")])


# ---- resume --------------------------------------------------------------------------------------

def test_two_sets_resume_exactly(tmp_path):
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    sets = {"val": [(x[:16], x[:16])], "test": [(x[16:], -x[16:])]}

    def run(steps, manager=None):  # a fresh process's view: new state, new callbacks
        callbacks = [fx.callbacks.early_stopping("val/loss", patience=100, restore_best=True,
                                                 name="es_val"),
                     fx.callbacks.early_stopping("test/loss", patience=100, name="es_test"),
                     fx.callbacks.checkpoint_policy(monitor="val/loss")]
        state, step = linear(lr=0.05)
        return fx.fit(state, step, fx.data.Batches((x, x), 8, shuffle=True, seed=1),
                      max_steps=steps, callbacks=callbacks, eval_step=fx.make_eval_step(mse),
                      eval_data=sets, eval_every=2, checkpoint=manager, progress=False)

    whole = run(10)
    with CheckpointManager(tmp_path, keep_best=1, best_metric="val/loss") as m:
        first = run(5, m)
        assert set(m.metrics(4)) == {"val/loss", "test/loss"}
    assert int(first.callbacks["es_test"].wait) == 1  # evaluations at 2 (best) and 4
    with CheckpointManager(tmp_path, keep_best=1, best_metric="val/loss") as m:
        resumed = run(10, m)
        assert m.best_step() == 10
    for name in ("es_val", "es_test", "checkpoint"):
        assert fx.tree_digest(resumed.callbacks[name]) == fx.tree_digest(whole.callbacks[name])
    es = resumed.callbacks["es_test"]
    assert (int(es.best_step), int(es.wait)) == (2, 4)
    assert torch.equal(resumed.params["weight"], whole.params["weight"])
    assert fx.tree_digest(resumed) == fx.tree_digest(whole)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("eval_data,error,said", [
    ({}, ValueError, "eval_data is an empty dict"),
    ({"val/a": TOWARD}, ValueError, r"evaluation set 'val/a' has a '/'.*'val_a'"),
    ({1: TOWARD}, TypeError, r"must be non-empty strings; got 1 \(int\)"),
    ({"": TOWARD}, TypeError, "must be non-empty strings; got ''"),
    ({"val": ONES}, TypeError, "evaluation set 'val' is Tensor, not batches"),
])
def test_bad_sets_are_refused_by_name(eval_data, error, said):
    with pytest.raises(error, match=said):
        fit(eval_data, 1)


def test_an_eval_step_dict_needs_the_same_sets():
    step = fx.make_eval_step(mse)
    with pytest.raises(ValueError, match=r"eval_step \['val'\] for eval_data \['val', 'test'\]"):
        fit({"val": TOWARD, "test": AWAY}, 1, eval_step={"val": step})
    with pytest.raises(ValueError, match=r"eval_step \['val'\] for eval_data batches"):
        fit(TOWARD, 1, eval_step={"val": step})


def test_a_best_metric_naming_no_set_is_refused_before_training(tmp_path):
    with CheckpointManager(tmp_path, keep_best=1, best_metric="loss") as m, \
            pytest.raises(ValueError, match=r"fit: the checkpoint manager's best_metric 'loss' "
                                            r"names no evaluation set.*\['val', 'test'\]"):
        fit({"val": TOWARD, "test": AWAY}, 2, checkpoint=m)
    assert m.all_steps() == []


def test_the_cli_takes_a_dict_of_sets_from_its_eval_data_factory(tmp_path, capsys):
    config = _project(tmp_path)
    with open(tmp_path / "models.py", "a") as f:
        f.write("\ndef sets():\n    return {'val': blobs(32, seed=1), 'test': blobs(32, seed=2)}\n"
                "\ndef bad_sets():\n    return {'val/a': blobs(32, seed=1)}\n"
                "\ndef none_set():\n    return {'val': blobs(32, seed=1), 'test': None}\n")
    work = tmp_path / "run"
    assert main(["train", str(config), "--workdir", str(work), "--eval_data",
                 "./models.py:bad_sets", "--max_steps", "4"]) == 2
    assert "evaluation set 'val/a' has a '/'" in capsys.readouterr().err
    assert main(["train", str(config), "--workdir", str(work), "--eval_data",
                 "./models.py:none_set", "--max_steps", "4"]) == 2
    assert "returned evaluation sets, of which 'test' is None, not batches" in \
        capsys.readouterr().err
    assert main(["train", str(config), "--workdir", str(work), "--eval_data", "./models.py:sets",
                 "--eval_every", "4", "--max_steps", "4", "--checkpoint_every", "null"]) == 0
    written = [line["values"] for line in fx.logging.read_jsonl(work / "metrics.jsonl")]
    assert any({"eval/val/loss", "eval/test/loss"} <= set(values) for values in written)
