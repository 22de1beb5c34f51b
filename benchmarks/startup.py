"""Start-up times a new user waits through, each in fresh processes: ``import torch``, ``import
fxtrain`` (and its first use), ``fxtrain --help``, ``fxtrain --version`` and ``fxtrain inspect``
on a small checkpoint directory. ``--source DIR`` measures the fxtrain checkout in DIR (put
first on ``PYTHONPATH``), so an older commit can be measured beside this one::

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/startup.py --source /tmp/before
    .venv/bin/python benchmarks/startup.py

Each figure is the median over ``--rounds`` processes, wall clock from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKPOINT = """
import sys, torch, fxtrain as fx
state = fx.TrainState.create(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)),
                             fx.optim.adamw(1e-3))
manager = fx.checkpoint.CheckpointManager(sys.argv[1], async_save=False)
for step in (10, 20):
    manager.save(state.replace(step=torch.tensor(step)), metrics={"loss": 1.0 / step})
manager.close()
"""

CLI = "import sys; from fxtrain.cli import main; sys.argv[0] = 'fxtrain'; sys.exit(main())"


def _timed(argv: list[str], env: dict, rounds: int, cwd: str) -> float | None:
    """The median wall time of ``argv`` over ``rounds`` fresh processes, or None when it fails
    (an older checkout without the command)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        if done.returncode != 0:
            return None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="the fxtrain checkout")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(args.source.resolve())}
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "checkpoints"
        # from a folder of its own: ``python -c`` puts the working directory first on the path,
        # where a checkout's fxtrain would shadow --source's
        subprocess.run([python, "-c", CHECKPOINT, str(directory)], env=env, check=True,
                       capture_output=True, cwd=tmp)
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        cases = {
            "python": [python, "-c", "pass"],
            "import torch": [python, "-c", "import torch"],
            "import torch, fxtrain": [python, "-c", "import torch, fxtrain"],
            "import fxtrain, first use": [python, "-c",
                                          "import fxtrain as fx; fx.TrainState; fx.fit"],
            "fxtrain --help": [python, "-c", CLI, "--help"],
            "fxtrain --version": [python, "-c", CLI, "--version"],
            "fxtrain inspect": [python, "-c", CLI, "inspect", str(directory)],
        }
        seconds = {name: _timed(cmd, env, args.rounds, tmp) for name, cmd in cases.items()}
    head = subprocess.run(["git", "-C", str(args.source.resolve()), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    result = {"source": str(args.source), "commit": head, "rounds": args.rounds,
              "checkpoint_bytes": size, "seconds": seconds,
              "fxtrain_over_torch": seconds["import torch, fxtrain"] - seconds["import torch"]}
    for name, value in seconds.items():
        print(f"{name:28s} " + ("  fails" if value is None else f"{value:6.2f} s"))
    print(f"{'import fxtrain over torch':28s} {result['fxtrain_over_torch']:6.2f} s "
          f"(commit {head}, {size / 1024:.0f} KB of checkpoints)")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
