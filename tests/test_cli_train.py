"""The command line a new user meets: ``--version`` and ``--help`` without torch, ``inspect``
reading JSON only, and ``fxtrain train CONFIG`` running the user's own model from a YAML or
Python config with overrides, ``--print-config`` and ``--resume``."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fxtrain as fx
from fxtrain.cli import main

MODELS = textwrap.dedent("""
    import torch
    from torch import nn
    import fxtrain as fx

    def mlp(width: int = 16):
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

    def blobs(n: int = 128, batch_size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return fx.data.Batches((x, x[:, :4].argmax(1)), batch_size, seed=seed)
    """)

YAML = textwrap.dedent("""
    model: ./models.py:mlp
    model_args: {width: 32}
    data: ./models.py:blobs
    loss: cross_entropy
    optim: {name: adamw, lr: 0.01, warmup_steps: 2}
    max_steps: 12
    compile: false
    log_every: 4
    checkpoint_every: 6
    progress: false
    """)


def _modules_after(code: str) -> dict:
    """Which heavy packages a fresh interpreter has imported after running ``code``."""
    probe = (f"import sys\n{code}\nimport json\nprint(json.dumps({{m: m in sys.modules for m in "
             "('torch', 'jax', 'orbax.checkpoint', 'numpy')}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_version_and_help_start_without_torch_and_show_no_markup(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fxtrain {fx.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "demo" in shown and "train" in shown and "inspect" in shown and "``" not in shown
    loaded = _modules_after("from fxtrain.cli import main\ntry:\n    main(['--help'])\n"
                            "except SystemExit:\n    pass")
    assert not loaded["torch"] and not loaded["numpy"], loaded


def test_inspect_lists_checkpoints_from_their_json_without_torch_or_jax(tmp_path):
    state = fx.TrainState.create(torch.nn.Linear(2, 1), fx.optim.adamw(1e-3))
    with fx.checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        manager.save(state, metrics={"loss": 0.25})
    code = (f"from fxtrain.cli import main\nassert main(['inspect', {str(tmp_path / 'ckpt')!r}, "
            "'--step', '0']) == 0")
    loaded = _modules_after(code)
    assert not loaded["torch"] and not loaded["jax"] and not loaded["orbax.checkpoint"], loaded
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "loss=0.25" in out and ".params['weight']" in out and "float32" in out


def _project(tmp_path, yaml=YAML):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "run.yaml").write_text(yaml)
    return tmp_path / "run.yaml"


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
    before = saved
    assert main(["train", str(config), "--workdir", str(work)]) == 2  # a run is there already
    assert "already holds a run" in capsys.readouterr().err
    assert (work / "config.yaml").read_text() == before  # nothing overwritten
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--max_steps", "18"]) == 0
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
    (["--optim.name", "adamm"], "fx.optim has no optimizer 'adamm'"),
    (["--loss", "hinge"], "'hinge' is none of cross_entropy, mse, causal_lm"),
    (["--model_args", "{depth: 3}"], "unexpected keyword argument 'depth'"),
])
def test_a_bad_config_says_which_key_and_changes_nothing(tmp_path, capsys, override, message):
    config = _project(tmp_path)
    work = tmp_path / "bad"
    assert main(["train", str(config), "--workdir", str(work), *override]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "checkpoints").exists()


def test_the_first_name_used_registers_every_pytree_type_before_anything_compiles():
    """A compiled step guards on the size of torch's pytree registry: a module of fxtrain's
    imported after the first compile would recompile it. The first use of any public name loads
    them all (``import fxtrain`` alone loads nothing)."""
    probe = textwrap.dedent("""
        import importlib, pkgutil, sys
        import torch, fxtrain as fx
        assert "fxtrain.state" not in sys.modules
        fx.TrainState
        import fxtrain.demo  # an application: fxtrain demo imports it before it compiles
        registered = len(torch.utils._pytree.SUPPORTED_NODES)
        late = []
        for info in pkgutil.walk_packages(fx.__path__, "fxtrain."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
                if len(torch.utils._pytree.SUPPORTED_NODES) != registered:
                    late.append(info.name)
                    registered = len(torch.utils._pytree.SUPPORTED_NODES)
        print(late)
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.needs_torch(2, 13, "fx.precompiled saving a compiled step")
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
                 "--max_steps", "18"]) == 0
    # loaded, not compiled and saved again (that replaces the file: another inode)
    assert (saved.stat().st_ino, saved.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert fx.checkpoint.CheckpointManager(work / "checkpoints").latest_step() == 18
    assert main(["train", str(config), "--workdir", str(work), "--resume", "true",
                 "--max_steps", "24", "--optim.lr", "0.2"]) == 0  # other step: made again
    assert saved.stat().st_ino != made.st_ino
