"""Models, batches, counters and the optional-extra import shared by the tests."""

import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn


def mlp(sizes=(8, 16, 4), dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.25), nn.Linear(4 * 6 * 6, 10))


def xent(state, params, batch):
    x, y = batch
    logits = state.apply(params, x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def classification_batch(n=16, features=8, classes=4, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 8, 8) if image else (n, features)
    return torch.randn(shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# torch.compile's backend for tests whose promise is the trace's (one graph, no recompiles, what
# the graph holds and returns), not Inductor's kernels: Dynamo and AOTAutograd trace as they do
# for Inductor, and the graph runs op by op. Inductor's code generation and C++ compiles were most
# of those tests' time (a 2-layer GPT-2 step: 50 CPU-s, 6 with this); the tests of compiled
# numerics (step reference, keyed masks, precision, remat's saved ops, donation) keep Inductor.
TRACED = "aot_eager"


def graph_count():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# Set by .ci/run: a test whose optional extra is missing fails instead of skipping, so a broken
# install cannot make tests vanish silently (tests/conftest.py also turns any skip into a failure).
REQUIRE_EXTRAS = os.environ.get("FXTRAIN_REQUIRE_EXTRAS") == "1"


def extra(module: str):
    """``module`` from an optional extra, for the test that needs it: a skip when it is not
    installed, or an ImportError under ``FXTRAIN_REQUIRE_EXTRAS=1``."""
    if REQUIRE_EXTRAS:
        return importlib.import_module(module)
    return pytest.importorskip(module)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """``proc``, killed with every process under it when the block ends and it is still running,
    so a test that fails or times out leaves no child behind (torchrun's ranks included)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                import psutil
                family = [*psutil.Process(proc.pid).children(recursive=True)]
            except Exception:  # psutil missing, or the process just ended
                family = []
            for p in [proc, *family]:
                with contextlib.suppress(Exception):
                    p.send_signal(signal.SIGKILL)
            proc.wait()


class FakeManager:
    """The checkpoint-manager protocol ``fit`` uses, recording the steps it is asked to save."""

    directory = Path("/nowhere")

    def __init__(self):
        self.saved = []

    def save(self, state, metrics=None, force=False):
        self.saved.append(int(state.step))
        return True

    def latest_step(self):
        return None

    def wait(self):
        pass


def sigint_back():
    """For ``Popen(preexec_fn=...)``: the child gets SIGINT's default action back. A background
    job of a non-interactive shell starts with SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so a Ctrl-C test would wait for ever wherever the suite ran that way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def token_documents(n=7, seed=1, longest=12):
    """``n`` documents of 3 to ``longest`` random token ids in 1..31 (for packing tests)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 32, (int(k),), generator=g).tolist()
            for k in torch.randint(3, longest + 1, (n,), generator=g)]


def padded_documents(docs):
    """One document a row, padded to the longest: ``input_ids``, ``labels`` (-100 on the
    padding) and ``attention_mask``."""
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    labels = torch.full((len(docs), width), -100)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, :len(d)], labels[i, :len(d)], mask[i, :len(d)] = torch.tensor(d), \
            torch.tensor(d), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def once_per_run(tmp_path_factory, name: str, make) -> Path:
    """A folder ``make(folder)`` filled once per test run, for every test that reads it. Under
    pytest-xdist the tests may land on both workers: the first makes it under a lock in the
    run's shared temporary folder, the other waits there and reads it (tests/conftest.py runs
    the first such test early and the rest last, so that none waits)."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's
    out = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (out / ".done").is_file():  # not made, or its maker failed part way
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            (out / ".done").touch()
    return out


TESTS = Path(__file__).resolve().parent
"""The tests folder (helpers.py, dist_worker.py and the kinds' folders: unit/, e2e/, ranks/,
tools/), for a process a test starts to import from."""
ROOT = TESTS.parent
"""The repository."""


# -- test_benchmarks.py's helpers -----------------------------------------------------------------

BENCHMARKS = ROOT / "benchmarks"


def script_module(name):
    """``scripts/<name>.py`` as a module, loaded from its file (the scripts folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported(script):
    """``benchmarks/<script>.py`` as a module (the scripts import each other by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(script)
    finally:
        sys.path.remove(str(BENCHMARKS))


# -- test_fit.py's helpers ------------------------------------------------------------------------

CTRL_C = """
import os, signal, sys, time, json
sys.path.insert(0, {tests!r})
import torch, fxtrain as fx
from helpers import mlp, xent

class Manager(fx.checkpoint.CheckpointManager):
    def save(self, state, metrics=None, force=False):
        saved = super().save(state, metrics, force)
        print("saved", int(state.step), flush=True)
        return saved

def slow(state, event):
    if event.kind == "step_end":
        print("step", event.step, flush=True)
        time.sleep(0.05)
    if event.kind == "train_end":
        print("train_end", event.metrics["reason"], flush=True)

x = torch.randn(64, 8); y = (x[:, 0] > 0).long()
state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1))
try:
    fx.fit(state, fx.make_train_step(xent), fx.data.Batches((x, y), 16), max_steps=10_000,
           callbacks=[slow], checkpoint=Manager({ckpt!r}))
except KeyboardInterrupt as e:
    print("interrupted at", int(e.state.step), flush=True)
    raise
"""


# -- the fused eager updates' tests (test_fused_adam, test_fused_sgd, test_fused_more) ----------

HOST_READS = ("item", "__float__", "__bool__", "__int__", "tolist")


def updated_reading_nothing(state, grads_of, steps: int, monkeypatch):
    """``steps`` eager updates of ``state`` (every other one donated), ``grads_of(params, i)``
    their gradients, with every way of reading a tensor's value on the host raising (on an
    accelerator, each would be a sync): the state after."""
    def read(*_):
        raise AssertionError("the update read a tensor's value on the host")

    for i in range(steps):
        grads = grads_of(state.params, i)
        with monkeypatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, read)
            state = state.apply_gradients(grads, donated=i % 2 == 0)
    return state


def fused_on_fake_tensors(tx, state, grads) -> list:
    """``tx.fused`` run on fake copies of ``grads`` and of ``state``'s optimizer state and
    parameters, pure and donated: its two results. A value read on the host raises there (an
    ``item()``, or a tensor passed where an op takes a Python number, which C++ reads, and
    which patching ``item`` misses)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        def fake(tree):
            return torch.utils._pytree.tree_map(
                lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, tree)
        return [tx.fused(fake(grads), fake(state.opt_state), fake(state.params), donated)
                for donated in (False, True)]


def small_model(dtype=torch.float32):
    """Linear(5, 7), Tanh, Linear(7, 3), seeded: the fused updates' tests' model."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(dtype)


def fixed_grads(params, step):
    """A fixed sequence of gradients for ``params``, of changing scale (not a function of the
    parameters, so that a rounding apart does not grow through a loss)."""
    g = torch.Generator().manual_seed(step)
    return {k: (torch.randn(p.shape, generator=g) * 10.0 ** (step % 5 - 2)).to(p.dtype)
            for k, p in params.items()}
