"""The run, its checkpoints and the damage done to them that tests/unit/test_checkpoint_damage.py,
test_checkpoint_flips.py and tests/e2e/test_checkpoint_damage_processes.py share (``saved``,
a fixture: a test module that uses it imports it by name)."""

import os
import shutil

import pytest
import torch

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from helpers import mlp, xent


# -- test_checkpoint_damage.py's helpers ----------------------------------------------------------

X = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def state():
    return fx.TrainState.create(mlp((64, 128, 2)), fx.optim.adam(1e-3), seed=0)


def batches():
    return fx.data.Batches((X, Y), 16, seed=1)


def template():
    """What a restore is given: a fresh state with the data stream's position."""
    return state().replace(data=batches().init())


def train(directory, steps):
    every5 = [fx.callbacks.checkpoint_policy(every=5)]
    with CheckpointManager(directory, keep_latest=3, async_save=False) as m:
        return fx.fit(state(), fx.make_train_step(xent), batches(), callbacks=every5, max_steps=steps, checkpoint=m)


def data_files(step_dir):
    """The array files orbax wrote (OCDBT data), largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
             and "ocdbt.process_" in str(p)]
    return sorted(files, key=lambda p: -p.stat().st_size)


def truncate(step_dir):
    f = data_files(step_dir)[0]
    os.truncate(f, f.stat().st_size // 2)


def empty_description(step_dir):
    (step_dir / "fxtrain" / "metadata").write_bytes(b"")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of steps 5 and 10, and the digest of the same run trained on to 15."""
    root = tmp_path_factory.mktemp("damage")
    train(root / "run", 10)
    return root / "run", fx.tree_digest(train(root / "whole", 15))


FIRST_SAVE_THEN_COMPILE = """
import sys, torch, fxtrain as fx
from torch import nn
state = fx.TrainState.create(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
                             fx.optim.adam(1e-3))
x, y = torch.randn(16, 64), torch.randint(0, 2, (16,))
loss = lambda s, p, b: torch.nn.functional.cross_entropy(s.apply(p, b[0]), b[1])
assert "orbax.checkpoint" not in sys.modules
with fx.checkpoint.CheckpointManager(sys.argv[1]) as manager:
    assert "orbax.checkpoint" in sys.modules, "orbax is imported when the manager is made"
    manager.save(state)  # asynchronous: written on the manager's thread
    step = torch.compile(fx.make_train_step(loss, donate=False), fullgraph=True,
                         backend="eager")
    state, _ = step(state, (x, y))  # traced while the first save is being written
    manager.save(state)
print("ok")
"""


UNREADABLE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch, fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, UnreadableCheckpointError
from helpers import mlp, xent
X = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()
data = fx.data.Batches((X, Y), 16, seed=1)
state = fx.TrainState.create(mlp((64, 128, 2)), fx.optim.adam(1e-3), seed=0)
with CheckpointManager(sys.argv[1], async_save=False) as m:
    try:
        fx.fit(state, fx.make_train_step(xent), data, max_steps=15, checkpoint=m)
    except UnreadableCheckpointError as e:
        print(e)
from fxtrain import cli
print("inspect exits", cli.main(["inspect", sys.argv[1], "--verify"]))
"""


def unprivileged() -> list[str]:
    """The command prefix that runs a child without the power to read any file (root reads
    files whatever their mode): nothing for another user; for root, setpriv taking away the
    capabilities that override file modes (the same user, so the same Python runs)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a file's mode cannot refuse a read")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
