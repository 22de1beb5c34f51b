"""The command line a new user meets: ``--version`` and ``--help`` without torch, ``inspect``
reading JSON only, and ``fxtrain train CONFIG`` running the user's own model from a YAML or
Python config with overrides, ``--print-config`` and ``--resume``; one run per workdir, a
resume checked against the saved config, and a bad config refused in one line before anything
is written."""

import json
import socket
import textwrap

import pytest
import torch

import fxtrain as fx
from fxtrain.cli import main
from fxtrain.apps._workdir import LOCK_NAME
from helpers_apps import YAML, _one_line, _project, _snapshot


def test_precision_32_unquoted_as_the_docs_spell_it_trains_in_float32(tmp_path, capsys):
    """Issue 75: ``precision: 32`` (YAML's int, the docs' own spelling) was refused by the
    parser; it is the policy "32", and the saved config says so."""
    config = _project(tmp_path, YAML + "precision: 32\n")
    work = tmp_path / "run"
    assert main(["train", str(config), "--workdir", str(work), "--max_steps", "4"]) == 0
    assert "done at step 4" in capsys.readouterr().out
    assert "precision: '32'" in (work / "config.yaml").read_text()


def test_train_runs_a_yaml_config_with_overrides_and_resumes(tmp_path, capsys, monkeypatch):
    config = _project(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # file references are the config's, not the cwd's
    work = tmp_path / "run"
    assert main(["train", str(config), "--optim.lr", "0.003", "--workdir", str(work)]) == 0
    assert "done at step 12" in capsys.readouterr().out
    saved = (work / "config.yaml").read_text()
    assert "lr: 0.003" in saved and "width: 32" in saved
    logged = [json.loads(line) for line in (work / "metrics.jsonl").open()]
    assert {4, 8, 12} <= {r["step"] for r in logged if "train/loss" in r["values"]}
    ended = fx.checkpoint.CheckpointManager(work / "checkpoints")
    assert ended.latest_step() == 12
    assert "resume" not in saved and "progress" not in saved  # how to run, not what
    before = saved
    assert main(["train", str(config), "--workdir", str(work)]) == 2  # a run is there already
    assert "already holds a run" in capsys.readouterr().err
    assert (work / "config.yaml").read_text() == before  # nothing overwritten
    assert main(["train", str(config), "--optim.lr", "0.003", "--workdir", str(work),
                 "--resume", "true", "--max_steps", "18", "--allow_changes", "max_steps"]) == 0
    assert "done at step 18" in capsys.readouterr().out


def test_train_from_python_equals_the_same_run_by_hand(tmp_path, monkeypatch):
    _project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = {"model": "models:mlp", "data": "models:blobs", "max_steps": 6, "compile": False,
              "optim": {"name": "sgd", "lr": 0.1, "schedule": "constant", "clip_norm": None},
              "workdir": str(tmp_path / "py"), "checkpoint_every": None, "progress": False}
    state = fx.train(config)
    import models  # the same factories, by hand

    torch.manual_seed(0)
    by_hand = fx.TrainState.create(models.mlp(), fx.optim.sgd(0.1), seed=0)

    def loss_fn(s, params, batch):
        logits = s.apply(params, batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1])

    by_hand = fx.fit(by_hand, fx.make_train_step(loss_fn), models.blobs(), max_steps=6,
                     progress=False)
    assert fx.tree_digest(state.params) == fx.tree_digest(by_hand.params)


def test_a_python_config_defines_config(tmp_path, capsys):
    _project(tmp_path)
    (tmp_path / "run.py").write_text(textwrap.dedent(f"""
        CONFIG = {{"model": "./models.py:mlp", "data": "./models.py:blobs", "max_steps": 4,
                  "compile": False, "workdir": {str(tmp_path / "w")!r}, "progress": False}}
        """))
    assert main(["train", str(tmp_path / "run.py")]) == 0
    assert "done at step 4" in capsys.readouterr().out


def test_print_config_shows_the_merged_config(tmp_path, capsys):
    config = _project(tmp_path)
    assert main(["train", str(config), "--max_steps", "7", "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert "max_steps: 7" in shown and "width: 32" in shown
    assert not (tmp_path / "runs").exists()  # printing trains nothing


@pytest.mark.parametrize("override, message", [
    (["--optim.lrr", "3"], "lrr"),
    (["--model", "./nowhere.py:mlp"], "model: no file"),
    (["--model", "./models.py:mlp_net"], "has no mlp_net"),
    (["--optim.name", "adamm"], "optim.name: fx.optim has no optimizer 'adamm' (did you mean "),
    (["--loss", "hinge"], "'hinge' is none of cross_entropy, mse, causal_lm"),
    (["--model_args", "{depth: 3}"], "unexpected keyword argument 'depth'"),
    (["--max_steps", "-5"], "max_steps: must be at least 1, got -5"),
    (["--max_steps", "0"], "max_steps: must be at least 1, got 0"),
    (["--keep", "0"], "keep: must be at least 1, got 0"),
    (["--log_every", "0"], "log_every: must be at least 1, got 0"),
    (["--checkpoint_every", "0"],
     "checkpoint_every: must be at least 1 (or null: at the end only), got 0"),
    (["--eval_every", "-3"], "eval_every: must be at least 1 (or null: at each epoch end), got -3"),
    (["--max_epochs", "0"], "max_epochs: must be at least 1 (or null: no limit), got 0"),
    (["--optim.warmup_steps", "50"],
     "optim.warmup_steps: must be at least 0 and below max_steps (12), got 50"),
    (["--optim.lr", "-1"], "optim.lr: must be a finite number >= 0, got -1.0"),
    (["--optim.clip_norm", "0"], "optim.clip_norm: must be > 0 (or null: no clipping), got 0.0"),
    (["--precision", "bogus"], "precision: 'bogus' is none of 32, bf16-mixed, 16-mixed, bf16-true"),
    (["--precision", "16"], "precision: '16' is none of 32, bf16-mixed, 16-mixed, bf16-true"),
    (["--batch_size", "auto", "--max_memory_mib", "0.001"],  # issue 75: was a traceback, exit 1
     "batch_size: auto: find_batch_size: no batch size fits, not even 1 (2: over max_bytes"),
    (["--max_memory_mib", "64"],  # issue 75: ignored without batch_size auto
     "max_memory_mib: caps batch_size auto's search, and batch_size is None: set batch_size: "
     "auto, or leave max_memory_mib out"),
    (["--optim.schedule", "cosine"],
     "optim.schedule: 'cosine' is none of constant, warmup_cosine, linear"),
    (["--model", "./models.py:broken"], "models.py:broken with model_args {'width': 32} raised "
                                        "ValueError: width must be even (models.py, line 13)"),
    (["--callbacks", "[{name: early_stopping, args: {patience: 2, bogus: 1}}]"],
     "callbacks: early_stopping with args {'patience': 2, 'bogus': 1}: "),
    (["--workdir", ""], "workdir: is empty; give the folder the run writes to"),
    (["--max_steps", "abc"], 'Parser key "max_steps": Expected a <class \'int\'>. Got value: abc'),
])
def test_a_bad_config_is_one_line_naming_the_key_and_changes_nothing(tmp_path, capsys,
                                                                     monkeypatch, override,
                                                                     message):
    config = _project(tmp_path)
    here = tmp_path / "cwd"  # a run that took "" for a workdir wrote here
    here.mkdir()
    monkeypatch.chdir(here)
    work = tmp_path / "bad"
    assert main(["train", str(config), "--workdir", str(work), *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxtrain train: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not work.exists() and list(here.iterdir()) == []


def test_a_resume_whose_model_fails_to_build_changes_nothing(tmp_path, capsys):
    config = _project(tmp_path)
    work = tmp_path / "run"
    assert main(["train", str(config), "--workdir", str(work)]) == 0
    before = _snapshot(work)
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--allow_changes", "true", "--model", "./models.py:broken"]) == 2
    assert "raised ValueError: width must be even" in _one_line(capsys)
    assert _snapshot(work) == before  # config.yaml not replaced, no lock left behind


def test_a_resume_with_another_config_is_refused_unless_allowed_and_the_old_one_kept(
        tmp_path, capsys):
    config = _project(tmp_path)
    work = tmp_path / "run"
    args = ["train", str(config), "--workdir", str(work)]
    assert main(args) == 0
    saved = (work / "config.yaml").read_bytes()
    before = _snapshot(work)
    changed = ["--resume", "true", "--optim.lr", "0.003", "--max_steps", "18"]
    assert main([*args, *changed]) == 2
    err = _one_line(capsys)
    assert "trained with another config: optim.lr 0.01 -> 0.003, max_steps 12 -> 18;" in err
    assert "--allow_changes optim.lr,max_steps" in err and "Nothing was changed" in err
    assert main([*args, *changed, "--allow_changes", "max_steps"]) == 2
    assert "another config: optim.lr 0.01 -> 0.003; " in _one_line(capsys)  # max_steps allowed
    assert _snapshot(work) == before
    assert main([*args, *changed, "--allow_changes", "optim,max_steps"]) == 0
    out = capsys.readouterr().out
    assert "(which trained" in out and "to step 12) is kept as config.12.yaml" in out
    assert "done at step 18" in out
    assert (work / "config.12.yaml").read_bytes() == saved  # nothing lost
    now = (work / "config.yaml").read_text()
    assert "lr: 0.003" in now and "max_steps: 18" in now
    made = (work / "config.yaml").stat()
    assert main([*args, *changed]) == 0  # the saved config now: nothing to allow or rewrite
    assert (work / "config.yaml").stat().st_mtime_ns == made.st_mtime_ns
    assert sorted(p.name for p in work.glob("config*.yaml")) == ["config.12.yaml", "config.yaml"]


def test_a_workdir_holding_something_else_is_refused(tmp_path, capsys):
    config = _project(tmp_path)
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    (work / "checkpoints").mkdir()  # empty: no checkpoint in it
    for resume in ("false", "true"):
        assert main(["train", str(config), "--workdir", str(work), "--resume", resume]) == 2
        assert "holds files of something else than a run of fxtrain train (checkpoints/, " \
               "notes.txt; no config.yaml); give an empty or new --workdir" in _one_line(capsys)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "notes.txt"]


# slow: the main suite only (its CLI logic is torch's on every version; fx.precompiled's load on
# 2.11 and 2.15 is test_precompile's, which the legs run): 11-12 CPU-s on each leg
@pytest.mark.slow
def test_a_resumed_precompiled_run_loads_the_step_its_first_run_saved(tmp_path):
    _project(tmp_path)
    config = tmp_path / "config.yaml"
    # a constant learning rate: a decaying one's length (max_steps) is compiled into the step
    config.write_text(YAML.replace("compile: false", "compile: precompiled").replace(
        "optim: {name: adamw, lr: 0.01, warmup_steps: 2}",
        "optim: {name: sgd, lr: 0.1, schedule: constant}"))
    work = tmp_path / "run"
    assert main(["train", str(config), "--workdir", str(work)]) == 0
    saved = work / "step.precompiled"
    made = saved.stat()
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--max_steps", "18", "--allow_changes", "max_steps"]) == 0
    # loaded, not compiled and saved again (that replaces the file: another inode)
    assert (saved.stat().st_ino, saved.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert fx.checkpoint.CheckpointManager(work / "checkpoints").latest_step() == 18
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--max_steps", "24", "--optim.lr", "0.2", "--allow_changes", "true"]) == 0
    # another step (lr 0.2): made again
    assert saved.stat().st_ino != made.st_ino


def test_a_resume_whose_restore_fails_leaves_the_workdir_as_it_was(tmp_path, capsys):
    """Issue 60, hole 4: an allowed change the checkpoint cannot take (another width) replaced
    config.yaml before the restore failed; then the documented resume failed and the true width
    was refused as a change. Refused in one line, exit 2, every file as it was; the documented
    resume still works."""
    config = _project(tmp_path)
    work = tmp_path / "run"
    assert main(["train", str(config), "--workdir", str(work)]) == 0
    capsys.readouterr()
    before = _snapshot(work)
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--model_args", "{width: 64}", "--allow_changes", "model_args"]) == 2
    err = _one_line(capsys)
    assert f"--resume: the checkpoint of step 12 in {work / 'checkpoints'} cannot be " \
           "restored into the model this config builds (shape of .params['0.bias']: " \
           "checkpoint (32,), template (64,); and 8 more)" in err
    assert "Nothing was changed." in err
    assert _snapshot(work) == before
    assert main(["train", str(work / "config.yaml"), "--resume", "true", "--max_steps", "18",
                 "--allow_changes", "max_steps"]) == 0
    assert "done at step 18" in capsys.readouterr().out


@pytest.mark.parametrize("factory, returned", [("nothing", "None"), ("number", "int"),
                                               ("arrays", "dict")])
def test_a_data_factory_returning_no_data_is_one_line_and_writes_nothing(tmp_path, capsys,
                                                                         factory, returned):
    """Issue 60, hole 6: a traceback, exit 1, and a workdir (config.yaml, metrics.jsonl,
    tensorboard/) that refused the fixed rerun. Now one line naming the key and the fix, exit 2,
    nothing written, for data and eval_data."""
    config = _project(tmp_path)
    work = tmp_path / "run"
    for key in ("data", "eval_data"):
        assert main(["train", str(config), "--workdir", str(work), f"--{key}",
                     f"./models.py:{factory}"]) == 2
        err = _one_line(capsys)
        assert f"{key}: {tmp_path / 'models.py'}:{factory} with {key}_args {{}} returned " \
               f"{returned}, not batches" in err
        assert "not batches: return fx.data.Batches" in err
        assert not work.exists()
    assert main(["train", str(config), "--workdir", str(work), "--max_steps", "3"]) == 0


# slow: the main suite only (the search itself is test_batch_size's, which the legs run):
# 7-9 CPU-s on each leg
@pytest.mark.slow
def test_train_batch_size_auto_searches_under_the_cap(tmp_path, capsys, monkeypatch):
    """--batch_size auto runs fx.find_batch_size on the run's step under --max_memory_mib (the
    CPU needs a cap) and trains at the size it prints; a plain --batch_size goes to the data
    factory."""
    config = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--workdir", str(tmp_path / "none"), "--batch_size",
                 "auto"]) == 2
    assert "max_memory_mib: batch_size auto on cpu needs a cap" in capsys.readouterr().err
    assert not (tmp_path / "none" / "config.yaml").exists()
    args = ["train", str(config), "--workdir", str(tmp_path / "auto"), "--batch_size", "auto",
            "--max_memory_mib", "0.25", "--max_steps", "4", "--data_args", "{n: 4096}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    chosen = int(out.split("batch_size auto: ")[1].split()[0])
    assert "does not fit" in out and f"batch size {chosen}" in out
    assert 16 < chosen < 4096
    assert main(["train", str(config), "--workdir", str(tmp_path / "fixed"), "--batch_size",
                 "24", "--max_steps", "3"]) == 0
    assert "batch_size: 24" in (tmp_path / "fixed" / "config.yaml").read_text()
    assert main(["train", str(config), "--workdir", str(tmp_path / "twice"), "--batch_size",
                 "24", "--data_args", "{batch_size: 8}"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_train_precision_fp8_is_refused_in_one_line_where_it_cannot_run(tmp_path, capsys,
                                                                          monkeypatch):
    """fp8 converts the config's model to torchao's float8 layers; on a CPU whose torch has
    no float8 product (no emulation from the command line) it is refused before anything is
    written, and so is a model with no layer float8 can take."""
    from fxtrain._torch import scaled_mm
    config = _project(tmp_path)
    monkeypatch.setattr(scaled_mm, "_cpu_product_runs", lambda rowwise: False)
    assert main(["train", str(config), "--workdir", str(tmp_path / "fp8"), "--precision",
                 "fp8"]) == 2
    err = capsys.readouterr().err
    assert "precision: precision 'fp8': float8 matrix products (torch._scaled_mm): this " \
           "torch" in err or "precision: precision='fp8' trains on torchao's float8" in err, err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    if scaled_mm.cpu_runs_float8(False):  # the config's layers (not multiples of 16) then
        assert main(["train", str(config), "--workdir", str(tmp_path / "fp8"), "--precision",
                     "fp8"]) == 2
        assert "no linear layer of Sequential passed the filter" in capsys.readouterr().err
    assert not (tmp_path / "fp8" / "config.yaml").exists()


POISONED = textwrap.dedent("""
    import torch
    import torch.nn.functional as F

    def nan_at_25(state, params, batch):  # the loss of step 25 is NaN, its gradients finite
        x, y = batch
        loss = F.cross_entropy(state.apply(params, x), y)
        return loss + torch.where(state.step == 24, float("nan"), 0.0)
    """)


def test_a_run_nan_guard_stops_exits_3_naming_the_step_the_metric_and_the_checkpoint(
        tmp_path, capsys):
    """nan_guard (a callback of the config) stops the run at step 25, whose loss is NaN:
    exit status 3 and one line naming the step, the loss, the latest checkpoint (step 20, kept
    with step 10), fx.debug.find_nonfinite and a resume with a lower learning rate, which runs
    as printed (and stops at the same planted step again)."""
    import shlex

    config = _project(tmp_path)
    (tmp_path / "poison.py").write_text(POISONED)
    work = tmp_path / "run"
    flags = ["--workdir", str(work), "--loss", "./poison.py:nan_at_25", "--max_steps", "30",
             "--checkpoint_every", "10", "--callbacks", "[{name: nan_guard}]"]
    assert main(["train", str(config), *flags]) == 3
    out, err = capsys.readouterr()
    assert "done at step" not in out and "fxtrain: stopped at step 25 by nan_guard" in out
    line = err.strip().splitlines()[-1]
    checkpoints = work / "checkpoints"
    assert line.startswith("fxtrain train: stopped at step 25: the loss was nan at step 25 "
                           "(nan_guard discarded that step's update"), line
    assert f"the latest checkpoint, of step 20, is in {checkpoints}" in line
    assert "fx.debug.find_nonfinite(train_step, state, batch)" in line
    assert fx.checkpoint.CheckpointManager(checkpoints).all_steps() == [10, 20]
    assert main(["inspect", str(checkpoints), "--verify"]) == 0  # whole, and finite to save
    capsys.readouterr()
    command = line.split("with other settings: ")[1]
    assert command == (f"fxtrain train {work / 'config.yaml'} --resume true --optim.lr 0.001 "
                       "--allow_changes optim.lr")
    assert main(shlex.split(command)[1:]) == 3
    out, err = capsys.readouterr()
    assert "resuming from the checkpoint of step 20" in out
    assert "stopped at step 25: the loss was nan at step 25" in err
    assert fx.checkpoint.CheckpointManager(checkpoints).all_steps() == [10, 20]
    assert (work / "config.20.yaml").is_file()  # the config that trained to step 20


def test_the_nonfinite_watch_names_the_first_nonfinite_metric_of_a_guard_that_stopped():
    """Which nan_guard stopped a run, at which step and metric (the gradient norm here), from
    fit's events; none for a run another callback stopped, or a guard that skipped only before
    a resume."""
    from types import SimpleNamespace

    from fxtrain.apps._nonfinite import watch
    from fxtrain.callbacks.nan_guard import NanGuardState

    def guard(skipped):
        return SimpleNamespace(callbacks={"nan_guard": NanGuardState(
            torch.tensor(skipped), torch.tensor(False))})

    def run(start, end, stopped_by):
        callback, stop = watch()
        callback(guard(start), fx.Event("setup", 4, 0, {"sync_every": 3}))
        for step, norm in [(5, 1.0), (6, float("inf")), (7, float("nan")), (8, 1.0)]:
            metrics = {"loss": torch.tensor(0.5), "grad_norm": torch.tensor(norm)}
            callback(guard(start), fx.Event("step_end", step, 0, metrics))
        callback(guard(end), fx.Event("train_end", 8, 0, {"reason": "stopped",
                                                          "stopped_by": stopped_by}))
        return stop()

    found = run(0, 1, "nan_guard: a step's loss or gradient norm was not finite")
    assert (found.stopped_at, found.step, found.metric, found.value) == (8, 6, "grad_norm",
                                                                        float("inf"))
    assert found.what() == "the gradient norm (grad_norm) was inf at step 6"
    assert run(0, 1, "early_stopping: no improvement") is None
    assert run(1, 1, "nan_guard: ...; early_stopping: no improvement") is None


def test_ctrl_c_saves_exits_130_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Issue 75: fxtrain train stopped by Ctrl-C ended with a traceback and exit 1 though fit
    had saved a whole step; now one line naming the step and the command that goes on, exit
    130, and that command resumes from the saved step."""
    import signal

    import fxtrain.loop._fit as fit_module
    real_fit = fit_module.fit

    def with_ctrl_c(state, step, data, *, callbacks=(), **kwargs):
        def press(state, event):
            if event.kind == "step_end" and event.step == 5:
                signal.raise_signal(signal.SIGINT)
            return state, fx.Control()
        return real_fit(state, step, data, callbacks=[*callbacks, press], **kwargs)

    config = _project(tmp_path)
    work = tmp_path / "run"
    monkeypatch.setattr(fit_module, "fit", with_ctrl_c)
    # Python's own SIGINT handler, whatever runs the suite (a background job of a shell starts
    # with SIGINT ignored: the Ctrl-C then never lands, and fit rightly holds nothing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["train", str(config), "--workdir", str(work)]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "fxtrain train: interrupted at step 5, saved in the workdir's checkpoints/" in err
    again = err.split("Continue with: ")[1].split()
    assert again[:2] == ["fxtrain", "train"] and again[-2:] == ["--resume", "true"]
    assert fx.checkpoint.CheckpointManager(work / "checkpoints").latest_step() == 5
    monkeypatch.setattr(fit_module, "fit", real_fit)
    assert main(again[1:]) == 0
    assert "done at step 12" in capsys.readouterr().out
