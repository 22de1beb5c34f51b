"""``fxtrain inspect``: the checkpoint table, one checkpoint's tree, and the offline digest."""

import subprocess
import sys

import torch

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from fxtrain.cli import main
from helpers_checkpoint import saved


def test_inspect_lists_checkpoints_with_metrics_and_sizes(tmp_path, capsys):
    saved(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loss=0.7" in out and "loss=0.4" in out and " KB" in out and "ago" in out
    assert "digest" not in out


def test_inspect_step_shows_the_tree_and_digest_matches_the_restored_state(tmp_path, capsys):
    state = saved(tmp_path)
    assert main(["inspect", str(tmp_path), "--step", "10", "--digest"]) == 0
    out = capsys.readouterr().out
    assert ".params['0.weight']" in out and "float32" in out and "(16, 8)" in out
    assert ".callbacks['timer']['elapsed']" in out and "1.25" in out
    assert "{'lr': 0.01}" in out
    restored = CheckpointManager(tmp_path).restore(like=state, step=10)
    assert f"digest (step 10): {fx.tree_digest(restored)}" in out
    assert fx.tree_digest(restored) == fx.tree_digest(state)


def test_inspect_a_one_off_checkpoint_and_bad_directories(tmp_path, capsys):
    tree = {"w": torch.randn(3).bfloat16(), "n": 3, "empty": torch.zeros(0)}
    fx.checkpoint.save(tmp_path / "one", tree)
    assert main(["inspect", str(tmp_path / "one"), "--digest"]) == 0
    assert fx.tree_digest(tree) in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.pt").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "other")]) == 1
    assert "no fxtrain checkpoints" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "one"), "--step", "3"]) == 1
    assert "no checkpoint of step 3" in capsys.readouterr().err
