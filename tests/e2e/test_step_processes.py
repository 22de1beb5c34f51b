"""test_step's tests that run processes (the rest: tests/unit/test_step.py)."""

import warnings
import pytest
import torch
import torch.nn.functional as F
import fxtrain as fx
from fxtrain import optim
from helpers import classification_batch, convnet, graph_count, mlp, xent
from helpers_step import BAD_STEP_ARGUMENTS


def test_make_train_step_checks_every_argument_before_it_changes_anything():
    """A bad argument is refused before anything is built: an ``autodiff="autograd"`` step
    with a bad ``steps_per_call`` (or any other) leaves Dynamo's settings as they were, and so
    does a good one (issue 76: they are on only while a step is traced; in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import torch, fxtrain as fx\n"
        "from torch._dynamo import config\n"
        "def settings():\n"
        "    return (config.trace_autograd_ops,\n"
        "            config.skip_fwd_side_effects_in_bwd_under_checkpoint)\n"
        "before = settings()\n"
        f"for bad in {[bad for bad, _ in BAD_STEP_ARGUMENTS.values()]!r}:\n"
        "    try:\n"
        "        fx.make_train_step(lambda s, p, b: p, autodiff='autograd', **bad)\n"
        "    except (TypeError, ValueError) as e:\n"
        "        print('refused:', e)\n"
        "    print('unchanged' if settings() == before else f'changed {settings()}')\n"
        "fx.make_train_step(lambda s, p, b: p, autodiff='autograd')\n"
        "print('good:', before, settings())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for i, (_, match) in enumerate(BAD_STEP_ARGUMENTS.values()):
        assert lines[2 * i].startswith(f"refused: make_train_step: {match}"), out.stdout
        assert lines[2 * i + 1] == "unchanged", out.stdout
    assert lines[-1] == "good: (False, False) (False, False)", out.stdout
