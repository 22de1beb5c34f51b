"""test_cli_train's tests that run processes (the rest: tests/unit/test_cli_train.py)."""

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
import pytest
import torch
import fxtrain as fx
from fxtrain.cli import main
from fxtrain.apps._workdir import LOCK_NAME
from helpers_apps import _gated, _modules_after, _one_line, _project, _snapshot, _start

pytestmark = pytest.mark.compat  # torch's pytree registry (SUPPORTED_NODES): every torch


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


def test_a_second_run_into_a_workdir_in_use_is_refused_naming_the_owner(tmp_path, capsys):
    """Two runs at once: the second is refused (it used to train into the same workdir and
    save its checkpoints there, so that every save of the first was skipped)."""
    config = _project(tmp_path)
    work, gate = tmp_path / "run", tmp_path / "gate"
    first = _start(_gated(config, work, gate))
    try:
        before = _snapshot(work)
        assert main(["train", str(config), "--workdir", str(work), "--optim.lr", "0.5"]) == 2
        err = _one_line(capsys)
        assert f"the workdir {work} is in use by " in err
        assert f"(pid {first.pid} on host {socket.gethostname()}, started " in err
        assert f"delete the lock file {work / LOCK_NAME}. Nothing was changed." in err
        assert _snapshot(work) == before
        gate.touch()
        out, errs = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0 and "done at step 12" in out, errs
    assert fx.checkpoint.CheckpointManager(work / "checkpoints").all_steps() == [6, 12]
    assert "lr: 0.01" in (work / "config.yaml").read_text()  # the first run's
    assert not (work / LOCK_NAME).exists()


def test_a_killed_first_attempt_is_taken_over_and_resumed_from_step_0_with_its_config(
        tmp_path, capsys):
    config = _project(tmp_path)
    work, gate = tmp_path / "run", tmp_path / "gate"
    first = _start(_gated(config, work, gate))
    first.kill()  # SIGKILL before its first checkpoint: its lock stays
    first.communicate()
    lock = work / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == first.pid
    assert (work / "config.yaml").exists() and not (work / "checkpoints").exists()
    saved = (work / "config.yaml").read_bytes()
    before = {k: v for k, v in _snapshot(work).items() if k != LOCK_NAME}
    with pytest.warns(RuntimeWarning, match=f"took over the lock {lock} of .* \\(pid "
                                            f"{first.pid} on host .*, which is not running"):
        assert main(_gated(config, work, gate)) == 2
    err = _one_line(capsys)
    assert "already holds a run (config.yaml and no checkpoint" in err
    assert "--resume true starts it again at step 0 with its config.yaml" in err
    assert _snapshot(work) == before  # the dead run's lock taken over, then released
    assert main([*_gated(config, work, gate), "--resume", "true", "--optim.lr", "0.5"]) == 2
    assert "another config: optim.lr 0.01 -> 0.5; " in _one_line(capsys)
    assert _snapshot(work) == before
    gate.touch()
    assert main([*_gated(config, work, gate), "--resume", "true"]) == 0
    out = capsys.readouterr().out
    assert f"--resume: no checkpoint in {work} yet; starting at step 0" in out
    assert "done at step 12" in out
    assert (work / "config.yaml").read_bytes() == saved
    assert fx.checkpoint.CheckpointManager(work / "checkpoints").all_steps() == [6, 12]


def test_the_first_name_used_registers_every_pytree_type_before_anything_compiles():
    """A compiled step guards on the size of torch's pytree registry: a module of fxtrain's
    imported after the first compile would recompile it. The first use of any public name loads
    them all (``import fxtrain`` alone loads nothing). Torchao registers pytree nodes of its
    own when it is imported, which fxtrain does only where a float8 policy converts a model
    (before that model's step compiles; ``fxtrain._torch.float8`` subclasses its layer): the
    probe imports it first, so that what it counts is fxtrain's."""
    probe = textwrap.dedent("""
        import importlib, importlib.util, pkgutil, sys
        import torch, fxtrain as fx
        if importlib.util.find_spec("torchao") is not None:
            import torchao.float8  # its own pytree nodes, not fxtrain's
        assert "fxtrain.state" not in sys.modules
        fx.TrainState
        import fxtrain.apps.demo  # an application: fxtrain demo imports it before it compiles
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
