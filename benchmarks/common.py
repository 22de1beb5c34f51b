"""What the benchmarks share: the MLP sizes, the model, the data, the loss, the common flags and
a description of the machine."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"tiny": ((64, 64, 10), 32), "large": ((784, 512, 512, 10), 128)}  # layers, batch
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2  # AdamW, the same in every variant


def make_mlp(sizes):
    """Linear layers of ``sizes`` with ReLU between, seeded."""
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def make_batches(sizes, batch, n=8):
    """``n`` fixed random batches ``(x, y)`` for the MLP of ``sizes``, seeded."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, sizes[0], generator=g),
             torch.randint(0, sizes[-1], (batch,), generator=g)) for _ in range(n)]


def cross_entropy(state, params, batch):
    """The fxtrain loss function every variant trains."""
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


BACKEND = "FXTRAIN_BENCH_BACKEND"  # torch.compile's backend in this process and its children


def scratch_folder(prefix: str = "fxtrain-bench-") -> str:
    """A new temporary folder, removed when the process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def backend() -> str:
    """torch.compile's backend for the timed variants: Inductor, or ``aot_eager`` in a
    ``--smoke`` run (``use_smoke_backend``): Dynamo and AOTAutograd trace as in the real run, but
    Inductor generates and compiles no kernels. A smoke run checks that a script works and
    reports every row; cold Inductor compiles were most of its time (the transformer smoke took
    230 s, 84 s without them), and the test suite compiles these models with Inductor elsewhere."""
    return os.environ.get(BACKEND, "inductor")


def use_smoke_backend() -> None:
    """Makes ``backend()`` ``aot_eager`` here and in the processes this one starts."""
    os.environ[BACKEND] = "aot_eager"


def in_fresh_process(script: str, argv: list[str], what: str, timeout: int = 1800) -> dict:
    """``python script --child *argv`` in a fresh interpreter (so each peak is its own): what
    its last line of output holds, as JSON; a failure raises with ``what`` and its stderr."""
    out = subprocess.run([sys.executable, script, "--child", *argv], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(runs: list[dict], key: str = "peak_bytes") -> float:
    """Bytes per parameter between two runs of different depths (what both runs hold apart
    from the parameters cancels)."""
    low, high = runs
    return (high[key] - low[key]) / (high["params"] - low["params"])


def arguments(doc: str, argv, *, rounds: int, steps: int) -> argparse.Namespace:
    """``--rounds --steps --sizes --smoke``; ``--smoke`` is one round of 5 steps, tiny only."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the script works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.sizes = 1, 5, ["tiny"]
        use_smoke_backend()
    return args


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def filesystem(path: Path) -> str:
    """The type, device and options of the mount holding ``path`` (from /proc/mounts): a
    ``discard`` option, for one, makes deleting old checkpoints slow."""
    best = ("", "?", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, options = line.split()[:4]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind, device, options)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} at {best[0]} ({best[3]})"
