"""test_traced_errors's tests that run processes (the rest: tests/unit/test_traced_errors.py)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batch, mlp, xent
import fxtrain as fx


def test_importing_fxtrain_does_not_import_dynamo_and_the_early_mark_is_dynamos(tmp_path):
    """Importing Dynamo takes 1.4 s, which importing fxtrain and building a state and a step
    (a CLI call, `fxtrain inspect`) never need: fxtrain marks its traced-for-real functions as
    Dynamo's decorator does (checked here against Dynamo's own mark), and a step compiled
    afterwards still raises fxtrain's errors."""
    import subprocess
    import sys

    code = """
import sys
import torch
import torch.nn.functional as F
from torch import nn
import fxtrain as fx
from fxtrain._torch.traced_errors import run_while_tracing

def loss_fn(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y, reduction="none")  # not reduced

def early():
    return True

run_while_tracing(early)
state = fx.TrainState.create(nn.Linear(4, 2), fx.optim.sgd(0.1))
batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
ok = lambda s, p, b: loss_fn(s, p, b).mean()
train_step = fx.make_train_step(ok)
assert "torch._dynamo" not in sys.modules, "importing fxtrain or building a step imported Dynamo"
fx.fit(state, train_step, [batch] * 3, max_epochs=1)  # (torch's custom ops import it)

def late():
    return True

torch.compiler.assume_constant_result(late)
assert vars(early) == vars(late), (vars(early), vars(late))
step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend="eager")
try:
    fx.fit(fx.TrainState.create(nn.Linear(4, 2), fx.optim.sgd(0.1)), step, [batch],
           max_epochs=1)
except TypeError as e:
    assert str(e).startswith("loss_fn must return a 0-d loss tensor"), e
    print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]
