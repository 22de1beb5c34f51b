"""What the step tests of several kinds share: the refused arguments of ``make_train_step``
(tests/unit/test_step.py, tests/e2e/test_step_processes.py), the tied and untied states of
tests/unit/test_layout.py and their digests in a fresh process (tests/e2e/test_layout_processes.py),
and ``fx.precompiled``'s model, child process and damaged files (tests/unit/test_precompile*.py,
tests/e2e/test_precompile_processes.py)."""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx


# -- test_step.py's helpers -----------------------------------------------------------------------

BAD_STEP_ARGUMENTS = {
    "steps_per_call": ({"steps_per_call": 0}, "steps_per_call must be a positive int, got 0"),
    "donate": ({"donate": "yes"}, "donate must be True, False or None"),
    "buffers": ({"buffers": "sum"}, "buffers must be 'mean' or 'local'"),
    "grad_stats": ({"grad_stats": "all"}, "grad_stats must be False, True or 'histograms'"),
    "data_parallel": ({"data_parallel": "auto"}, "data_parallel must be True, False or None"),
}


# -- test_layout.py's helpers ---------------------------------------------------------------------

class Tied(nn.Module):
    """An embedding tied to its head: the state keeps ``emb.weight`` once, and a mask may name
    the head's ``head.weight`` for it."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(10, 4), nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.ln(self.emb(x)))


class Untied(Tied):
    """The same names, not tied: ``head.weight`` is a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.head.weight = nn.Parameter(self.emb.weight.detach().clone())


def made(kind):
    torch.manual_seed(0)
    tx = fx.optim.adamw(0.1, weight_decay=0.5, mask=["head.weight"])  # the head decays
    return fx.TrainState.create(Tied() if kind == "tied" else Untied(), tx, seed=0)


def trained(state, steps=3):
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).logsumexp(-1).mean())
    x = torch.arange(6).view(2, 3)
    for _ in range(steps):
        state, _ = step(state, x)
    return fx.tree_digest(state)


RUN = """
import sys
sys.path.insert(0, {tests!r})
from helpers_step import made, trained
states = {{kind: made(kind) for kind in {kinds!r}}}  # all made before any trains
print(" ".join(trained(states[kind]) for kind in {kinds!r}))
"""


def digests(*kinds):
    """The digests of ``kinds`` made in this order in a process of their own, then trained (a
    fresh process: nothing made before them, and torch's settings its own)."""
    import pathlib
    code = RUN.format(tests=str(pathlib.Path(__file__).parent), kinds=kinds)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return dict(zip(kinds, out.stdout.strip().splitlines()[-1].split()))


HOOK = """
import sys
import torch
from torch import nn
import fxtrain as fx
state = fx.TrainState.create(nn.Linear(2, 2), fx.optim.sgd(0.1))
step = fx.make_train_step(lambda s, p, b: s.apply(p, b).sum(), autodiff="autograd")
assert "torch._dynamo" not in sys.modules, "building a step imported Dynamo"
import torch._dynamo
config = torch._dynamo.config
print(config.trace_autograd_ops, config.skip_fwd_side_effects_in_bwd_under_checkpoint)
state, metrics = torch.compile(step, fullgraph=True, backend="aot_eager")(state, torch.ones(3, 2))
print(config.trace_autograd_ops, config.skip_fwd_side_effects_in_bwd_under_checkpoint)
"""


# -- test_precompile.py's helpers -----------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import fxtrain as fx

    def loss_fn(state, params, batch):
        x, y = batch
        return F.cross_entropy(state.apply(params, x), y)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 3))
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2), seed=0)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))

    def train(step, state):
        for _ in range(3):
            state, metrics = step(state, batch)
        return state, metrics

    step = fx.precompiled(fx.make_train_step(loss_fn), sys.argv[1])
    trained, metrics = train(step, state)
    out = {"loaded": step.loaded, "digest": fx.tree_digest(trained),
           "loss": float(metrics["loss"])}
    if sys.argv[2] == "save+reference":  # and torch.compile's steps, in the same process
        reference = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)
        out["reference"] = fx.tree_digest(train(reference, state)[0])
    print(json.dumps(out))
""")


def loss_fn(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def setup(lr=1e-2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
    return fx.TrainState.create(model, fx.optim.sgd(lr)), batch


QUICK = {"cpp_wrapper": False}  # the Python wrapper: seconds less to compile, where it is moot


def steps(step, state, batch, n=2):
    for _ in range(n):
        state, metrics = step(state, batch)
    return state, metrics


def child(tmp_path, path, mode, env=None):
    """CHILD's result in a new process: ``mode`` "save" or "load" (fx.precompiled's step at
    ``path``), or "save+reference" (then torch.compile's step too, its digest "reference");
    and what it wrote to stderr."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script), str(path), mode], text=True,
                          capture_output=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def so_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.glob("*/*.so")}


def flip(data: bytes, at: int, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[at] ^= 1 << bit
    return bytes(flipped)


def in_a_kernel(data: bytes) -> bytes:
    """The learning rate in the C++ source of the SGD update's kernel, 0.01 made 0.03 by one
    bit: before issue 46 a process whose Inductor cache was cold compiled it and trained with it,
    without a word."""
    at = data.index(b"static_cast<float>(-0.01)") + len(b"static_cast<float>(-0.0")
    return flip(data, at, 1)


DAMAGED = "is damaged (its contents do not match its SHA-256 checksum)"


REPLACED, KEPT = "the step is compiled again, saved over it", (
    "the step is compiled again, trains, but is not saved: fxtrain never overwrites a file it "
    "cannot read as its own (give another path, or delete it)")


def module_values():
    """Every module-level value of every fxtrain module loaded, by (module, name): its
    identity, and for a container the identities of what it holds."""
    out = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fxtrain") or not isinstance(module, types.ModuleType):
            continue
        for key, value in vars(module).items():
            held = ()
            if isinstance(value, dict):
                held = tuple((k, id(v)) for k, v in value.items())
            elif isinstance(value, (list, set)):
                held = tuple(sorted(map(id, value)))
            out[name, key] = (id(value), held)
    return out
