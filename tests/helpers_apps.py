"""What the tests of fxtrain's applications share across kinds: ``fxtrain train``'s project and
runs (tests/unit/test_cli_train.py, tests/e2e/test_cli_train_processes.py), the demo's runs
(tests/unit/test_demo.py, tests/e2e/test_demo_processes.py) and the workdir's lock
(tests/unit/test_workdir.py, tests/e2e/ and tests/ranks/ counterparts)."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fxtrain.apps._workdir import LOCK_NAME, held
from helpers import ROOT, sigint_back


# -- test_cli_train.py's helpers ------------------------------------------------------------------

MODELS = textwrap.dedent("""
    import os
    import time

    import torch
    from torch import nn
    import fxtrain as fx

    def mlp(width: int = 16):
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

    def broken(width: int = 16):
        raise ValueError("width must be even")

    def blobs(n: int = 128, batch_size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return fx.data.Batches((x, x[:, :4].argmax(1)), batch_size, seed=seed)

    def nothing(n: int = 128):
        return None

    def number(n: int = 128):
        return n

    def arrays(n: int = 128):
        x = torch.randn(n, 8)
        return {"x": x, "y": x[:, :4].argmax(1)}

    def gated(gate: str, after: int = 2):
        # endless batches; before batch `after` it says so (gate.waiting), then waits for `gate`
        def batches():
            g = torch.Generator().manual_seed(0)
            for i in range(100_000):
                if i == after:
                    open(gate + ".waiting", "w").close()
                    deadline = time.time() + 120
                    while not os.path.exists(gate):
                        if time.time() > deadline:
                            raise TimeoutError(gate)
                        time.sleep(0.02)
                x = torch.randn(16, 8, generator=g)
                yield x, x[:, :4].argmax(1)
        return batches()
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


def _project(tmp_path, yaml=YAML):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "run.yaml").write_text(yaml)
    return tmp_path / "run.yaml"


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fxtrain train: error: ") and err.count("\n") == 1, err
    return err


def _gated(config: Path, work: Path, gate: Path) -> list[str]:
    return ["train", str(config), "--workdir", str(work), "--data", "./models.py:gated",
            "--data_args", f"{{gate: {gate}}}"]


def _start(args: list[str]) -> subprocess.Popen:
    """``fxtrain train ARGS`` in another process, and waits until it blocks at its gate."""
    run = subprocess.Popen([sys.executable, "-m", "fxtrain", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    waiting = Path(args[args.index("--data_args") + 1][7:-1] + ".waiting")
    deadline = time.time() + 120
    while not waiting.exists():
        if run.poll() is not None or time.time() > deadline:
            run.kill()
            raise AssertionError(f"the first run ended early: {run.communicate()}")
        time.sleep(0.05)
    return run


# -- test_demo.py's helpers -----------------------------------------------------------------------

def digest_of(stdout: str) -> str:
    (digest,) = re.findall(r"state digest: ([0-9a-f]{64})", stdout)
    return digest


def run_cli(workdir, *flags, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fxtrain", "demo", "--workdir", str(workdir),
                             "--no-progress", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=sigint_back, **kwargs)


def wait_for_checkpoint(proc, directory: Path, step: int, timeout=240):
    deadline = time.monotonic() + timeout
    while not (directory / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


KILLED_RUNS = {  # model -> (its flags, the checkpoint step to kill after)
    # the demo as docs/demo.md runs it, default flags: compiled steps, every callback, logs,
    # 1500 steps (evaluations every 100, figures every 500 after the kill at 250); the
    # uninterrupted run also shows the stated accuracy
    "mlp": ([], 250),
    # a GPT with keyed SDPA attention dropout and keyed text samples, compiled: its embedding's
    # backward is a scatter-add, compiled to atomic adds in a varying order unless torch's
    # deterministic algorithms are on (the demo turns them on)
    "transformer": (["--model", "transformer", "--steps", "40", "--batch-size", "8",
                     "--eval-every", "20", "--checkpoint-every", "20", "--log-every", "10",
                     "--media-every", "30"], 20),
}


# -- test_workdir.py's helpers --------------------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(workdir: Path, **owner) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getppid(), "host": socket.gethostname(),
             "started": "2999-01-01T00:00:00+00:00", "command": "fxtrain train old.yaml", **owner}
    (workdir / LOCK_NAME).write_text(json.dumps(owner))
    return workdir / LOCK_NAME


RACER = textwrap.dedent("""
    import sys, time, warnings
    from fxtrain.apps._workdir import WorkdirLocked, acquire, release
    warnings.simplefilter("ignore")
    while time.time() < float(sys.argv[2]):  # start together
        pass
    try:
        lock = acquire(sys.argv[1], "racer")
    except WorkdirLocked as e:
        print("refused", e)
    else:
        print("won")
        time.sleep(1.0)
        release(lock)
    """)


def _ranks(rank: int, port: int, workdir: str) -> None:
    """Each of two gloo ranks: held() takes the lock on rank 0 only; a held workdir is refused
    on every rank."""
    import torch

    from fxtrain import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    distributed.init()
    try:
        with held(Path(workdir) / "free") as lock:
            owner = json.loads(lock.path.read_text())
            distributed.barrier()
        distributed.barrier()  # rank 0 has released it
        result = {"owner": owner["pid"], "me": os.getpid(), "released": not lock.path.exists()}
        if rank == 0:
            write_lock(Path(workdir) / "busy")  # by our parent, the test: alive
        distributed.barrier()
        try:
            with held(Path(workdir) / "busy"):
                result["refused"] = None
        except Exception as e:
            result["refused"] = f"{type(e).__name__}: {e}"
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()
