"""Checkpoint save and restore times: fxtrain (orbax) against torch.save and safetensors.

The state is a real ``fx.TrainState`` of an nn.Sequential of square Linear layers with Adam: three
equal float32 parts (params, mu, nu; mu and nu filled with noise, not zeros), sized to about
``--sizes`` MB in all. Every variant runs once per round, interleaved, and the median of the
rounds is reported.

Saves (each ends durable: its bytes and its rename fsynced):
  fxtrain async  CheckpointManager(keep_latest=1, async_save=True), a new step each round:
                 "blocking" is until save() returns, "wait" until wait() returns, "durable" adds
                 an fsync of every file and directory of the new checkpoint after wait() (cheap
                 when the manager already flushed them; it says whether it did, see the notes).
  fxtrain sync   the same with async_save=False: save() plus the same fsync.
  fx.save        fx.checkpoint.save(path, state), the one-off synchronous save, then the
                 previous one deleted (every variant replaces its previous checkpoint).
  torch          torch.save of a flat {path: tensor} dict into path.tmp, flush, fsync,
                 os.replace onto the final path, fsync of the directory.
  safetensors    safetensors.torch.save_file of the same dict, then the same fsync and rename.
  fx sharded     the sharded format fx.shard's states are saved in (torch.distributed.checkpoint
                 shards, the table with every shard file's size and CRC-32), written by one
                 process, then the previous one deleted.
Restores, each "cold" (every file of the checkpoint fsynced and dropped from the page cache with
posix_fadvise(DONTNEED), no root needed) and then "warm" (read again at once):
  fxtrain        manager.restore(like=state) of the async manager's latest checkpoint
  torch          torch.load(path, weights_only=True, mmap=False)
  safetensors    safetensors.torch.load_file(path, backend="pread") (the default "mmap" backend
                 returns lazily mapped tensors: nothing would be read)
  fx sharded     fx.checkpoint.restore(path, like=state) of the sharded checkpoint, and on its own
                 the check of its shard files' checksums that the restore begins with (warm: about
                 what computing them adds to a save, whose files are in the page cache)

Run: python benchmarks/checkpoint.py [--sizes 10,400,1300] [--rounds 3] [--dir DIR] [--smoke]
Prints one markdown table per size: median seconds and ratios against torch's (crash-safe) save
and load, with the targets of the checkpoint issue next to the fxtrain rows.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import fxtrain as fx
from fxtrain.checkpoint import bridge, shards, store
from fxtrain.checkpoint.files import fsync_path
from fxtrain.checkpoint.store import fsync_tree  # the original, not the counted one (ManagerFsyncs)
from fxtrain.tree import leaves_with_paths
from common import cpu_model, filesystem

LAYERS = 8
# the checkpoint issue's targets: row -> the most it may take, as a ratio to its torch row
TARGETS = {"fx_async_blocking": 0.1, "fx_async_durable": 1.5, "fx_sync_durable": 1.5,
           "fx_restore_cold": 1.5}

# -- the state ------------------------------------------------------------------------------


def make_state(megabytes: float) -> fx.TrainState:
    """A TrainState of LAYERS square Linear layers and Adam, about ``megabytes`` MB in all."""
    per_part = megabytes * 1e6 / 3 / 4  # float32 numbers in each of params, mu and nu
    width = max(4, int(math.sqrt(per_part / LAYERS)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])
    state = fx.TrainState.create(model, fx.optim.adam(1e-3))
    for _, leaf in leaves_with_paths(state.opt_state):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim():
            leaf.normal_()  # realistic moments: no zero pages for the disk or the cache
    return state


def flat_tensors(state) -> dict[str, torch.Tensor]:
    """The state's tensors by path, as torch.save and safetensors store them."""
    return {p: t for p, t in leaves_with_paths(state) if isinstance(t, torch.Tensor)}


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(state).values())


def same_tensors(expected: dict, got: dict) -> bool:
    keys = [k for k in expected if k != ".step"]
    return all(k in got and torch.equal(expected[k], got[k]) for k in keys)


# -- files ----------------------------------------------------------------------------------


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [Path(root) / name for root, _, names in os.walk(path) for name in names]


def evict(path: Path) -> None:
    """Drops every file under ``path`` from the page cache (flushed first: dirty pages stay)."""
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_size(path: Path) -> tuple[int, int]:
    """(bytes, number of files) of the checkpoint at ``path``."""
    files = files_under(path)
    return sum(f.stat().st_size for f in files), len(files)


def crash_safe(write, path: Path) -> None:
    """``write(tmp)`` then fsync, rename onto ``path`` and fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


# -- the variants ---------------------------------------------------------------------------


class ManagerFsyncs:
    """Counts the manager's own calls of ``store.fsync_tree``: is its checkpoint flushed?"""

    def __init__(self):
        self.calls, self._original = 0, store.fsync_tree

        def counted(path):
            self.calls += 1
            return self._original(path)

        store.fsync_tree = counted

    def close(self):
        store.fsync_tree = self._original


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def fx_manager_save(manager, state, prefix: str) -> dict[str, float]:
    """One save with ``manager``: until save() returns, until wait() returns, until flushed."""
    start = time.perf_counter()
    if not manager.save(state):
        raise RuntimeError(f"the manager skipped step {int(state.step)}")
    blocking = time.perf_counter() - start
    manager.wait()
    waited = time.perf_counter() - start
    fsync_tree(manager.directory / str(int(state.step)))
    durable = time.perf_counter() - start
    if manager.async_save:
        return {f"{prefix}_blocking": blocking, f"{prefix}_wait": waited,
                f"{prefix}_durable": durable}
    return {f"{prefix}_durable": durable}


def torch_save(flat: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(flat, f)
            f.flush()
            os.fsync(f.fileno())

    crash_safe(write, path)


def safetensors_save(flat: dict, path: Path) -> None:
    crash_safe(lambda tmp: safetensors.torch.save_file(flat, tmp), path)


class Bench:
    """The checkpoints of one size in ``root``, and the timings of every round."""

    def __init__(self, root: Path, state):
        self.root, self.state, self.flat = root, state, flat_tensors(state)
        self.fx_async = fx.checkpoint.CheckpointManager(root / "fx_async", keep_latest=1,
                                                        async_save=True)
        self.fx_sync = fx.checkpoint.CheckpointManager(root / "fx_sync", keep_latest=1,
                                                       async_save=False)
        self.torch_path, self.st_path = root / "state.pt", root / "state.safetensors"
        self.times: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}
        self.fsyncs: dict[str, list[int]] = {"fx_async": [], "fx_sync": []}
        self.checked = False
        self.disk: dict[str, tuple[int, int]] = {}

    def record(self, results: dict[str, float]) -> None:
        for name, seconds in results.items():
            self.times.setdefault(name, []).append(seconds)

    def attempt(self, name: str, fn, *args) -> None:
        """Runs a variant; one that raises is reported as failed and not run again."""
        if name in self.failed:
            return
        try:
            self.record(fn(*args))
        except Exception as e:  # noqa: BLE001 - a broken variant is a result, not a crash
            self.failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"

    def fx_saves(self, state) -> None:
        for name, manager in (("fx_async", self.fx_async), ("fx_sync", self.fx_sync)):
            counter = ManagerFsyncs()
            try:
                self.attempt(name, fx_manager_save, manager, state, name)
            finally:
                counter.close()
            if name not in self.failed:
                self.fsyncs[name].append(counter.calls)

    def one_off_save(self, state) -> dict[str, float]:
        """fx.checkpoint.save, then the previous one deleted: a keep-1 rotation like the others
        (freeing the old blocks is not free: torch's os.replace and keep_latest pay it too)."""
        folder = self.root / "fx_save"
        folder.mkdir(exist_ok=True)
        previous = list(folder.iterdir())
        start = time.perf_counter()
        fx.checkpoint.save(folder / str(int(state.step)), state)
        for path in previous:
            shutil.rmtree(path)
        return {"fx_save_durable": time.perf_counter() - start}

    def sharded_save(self, state) -> dict[str, float]:
        """The sharded format, written by one process (no process group), then the previous one
        deleted."""
        folder = self.root / "fx_sharded"
        folder.mkdir(exist_ok=True)
        previous = list(folder.iterdir())
        start = time.perf_counter()
        values, meta = bridge.table(state)
        shards.write(folder / str(int(state.step)), values, store.meta_for(state, meta, {}, {}))
        for path in previous:
            shutil.rmtree(path)
        return {"fx_sharded_durable": time.perf_counter() - start}

    def saves(self, step: int) -> None:
        state = self.state.replace(step=torch.tensor(step))
        self.fx_saves(state)
        self.attempt("fx_save", self.one_off_save, state)
        self.attempt("fx_sharded", self.sharded_save, state)
        self.record({"torch_durable": timed(torch_save, self.flat, self.torch_path)[0]})
        self.record({"st_durable": timed(safetensors_save, self.flat, self.st_path)[0]})

    def restore_once(self, name: str, path: Path, load, compare: bool = True) -> None:
        for temperature in ("cold", "warm"):
            if temperature == "cold":
                evict(path)
            seconds, restored = timed(load)
            self.record({f"{name}_{temperature}": seconds})
            if compare and not self.checked:
                got = restored if isinstance(restored, dict) else flat_tensors(restored)
                if not same_tensors(self.flat, got):
                    raise AssertionError(f"{name} restored different tensors")
            del restored
            gc.collect()

    def restores(self) -> None:
        fx_path = self.fx_async.directory / str(self.fx_async.latest_step())
        self.restore_once("fx_restore", fx_path, lambda: self.fx_async.restore(like=self.state))
        self.restore_once("torch_load", self.torch_path,
                          lambda: torch.load(self.torch_path, weights_only=True, mmap=False))
        self.restore_once("st_load", self.st_path,
                          lambda: safetensors.torch.load_file(self.st_path, backend="pread"))
        if "fx_sharded" not in self.failed:
            path = max((self.root / "fx_sharded").iterdir(), key=lambda p: int(p.name))
            self.restore_once("fx_sharded_restore", path,
                              lambda: fx.checkpoint.restore(path, like=self.state))
            self.restore_once("fx_sharded_check", path,
                              lambda: shards.verify_files(path, store.read_meta(path)),
                              compare=False)
        self.checked = True

    def sizes(self) -> dict[str, tuple[int, int]]:
        fx_path = self.fx_async.directory / str(self.fx_async.latest_step())
        return {"fxtrain (orbax OCDBT directory)": disk_size(fx_path),
                "torch.save": disk_size(self.torch_path),
                "safetensors": disk_size(self.st_path)}

    def close(self) -> None:
        for manager in (self.fx_async, self.fx_sync):
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - a failed save was already reported
                pass


def measure(megabytes: float, rounds: int, root: Path) -> Bench:
    """Runs ``rounds`` interleaved rounds at one size; returns the finished Bench."""
    state = make_state(megabytes)
    bench = Bench(root, state)
    try:
        for r in range(rounds):
            bench.saves(r + 1)  # a new step each round
            bench.restores()
        bench.disk = bench.sizes()
    finally:
        bench.close()
    return bench


# -- the report -----------------------------------------------------------------------------

ROWS = [  # (key, label, the torch row it is compared with)
    ("torch_durable", "torch.save crash-safe (durable)", "torch_durable"),
    ("fx_async_blocking", "fxtrain async: save() returns (blocking)", "torch_durable"),
    ("fx_async_wait", "fxtrain async: wait() returns", "torch_durable"),
    ("fx_async_durable", "fxtrain async: wait() + fsync of the checkpoint (durable)",
     "torch_durable"),
    ("fx_sync_durable", "fxtrain sync manager: save() + fsync (durable)", "torch_durable"),
    ("fx_save_durable", "fx.checkpoint.save one-off + delete the previous (sync)",
     "torch_durable"),
    ("st_durable", "safetensors crash-safe (durable)", "torch_durable"),
    ("fx_sharded_durable", "fxtrain sharded format, one process, with file checksums (durable)",
     "torch_durable"),
    ("torch_load_cold", "torch.load cold", "torch_load_cold"),
    ("fx_restore_cold", "fxtrain manager.restore cold", "torch_load_cold"),
    ("st_load_cold", "safetensors load_file cold", "torch_load_cold"),
    ("fx_sharded_restore_cold", "fxtrain sharded restore cold", "torch_load_cold"),
    ("fx_sharded_check_cold", "  of which: checking the shard files' checksums, cold",
     "torch_load_cold"),
    ("torch_load_warm", "torch.load warm", "torch_load_warm"),
    ("fx_restore_warm", "fxtrain manager.restore warm", "torch_load_warm"),
    ("st_load_warm", "safetensors load_file warm", "torch_load_warm"),
    ("fx_sharded_restore_warm", "fxtrain sharded restore warm", "torch_load_warm"),
    ("fx_sharded_check_warm", "  of which: checking the shard files' checksums, warm",
     "torch_load_warm"),
]


def failure_of(bench: Bench, key: str) -> str | None:
    for name, message in bench.failed.items():
        if key.startswith(name + "_"):
            return message
    return None


def row(bench: Bench, med: dict, key: str, label: str, base: str) -> str:
    target = TARGETS.get(key)
    goal = f"<= {target}x" if target else ""
    if key not in med:
        why = failure_of(bench, key) or "not run"
        return f"| {label} | FAILED | | | {goal} | {why} |"
    ratio = med[key] / med[base]
    met = ("yes" if ratio <= target else "**no**") if target else ""
    spread = f"{min(bench.times[key]):.3f}-{max(bench.times[key]):.3f}"
    return f"| {label} | {med[key]:.3f} | {spread} | {ratio:.2f}x | {goal} | {met} |"


def fsync_note(bench: Bench) -> list[str]:
    lines = []
    for name, calls in bench.fsyncs.items():
        if calls:
            verdict = "flushed it" if min(calls) else "did NOT flush it"
            lines.append(f"- {name}: the manager called store.fsync_tree {calls} times per save "
                         f"(per round): it {verdict} itself; the 'durable' row adds our fsync.")
    return lines


def report(megabytes: float, bench: Bench, rounds: int) -> None:
    med = {k: statistics.median(v) for k, v in bench.times.items()}
    width = bench.state.params["0.weight"].shape[0]
    print(f"\n### {megabytes:g} MB state: {state_bytes(bench.state) / 1e6:.1f} MB "
          f"({LAYERS} Linear layers {width}x{width}, params + Adam mu + nu), "
          f"median of {rounds} round(s)\n")
    print("| variant | seconds (median) | min-max | vs torch | target | met |")
    print("|---|---|---|---|---|---|")
    for key, label, base in ROWS:
        print(row(bench, med, key, label, base))
    print("\n| format | size on disk | files | vs torch.save |")
    print("|---|---|---|---|")
    torch_bytes = bench.disk["torch.save"][0]
    for name, (nbytes, nfiles) in bench.disk.items():
        print(f"| {name} | {nbytes / 1e6:.1f} MB | {nfiles} | {nbytes / torch_bytes:.3f}x |")
    notes = fsync_note(bench)
    if notes:
        print("\n" + "\n".join(notes))


def header(root: Path) -> None:
    version = importlib.metadata.version
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}")
    print(f"torch {torch.__version__}, orbax-checkpoint {version('orbax-checkpoint')}, "
          f"safetensors {version('safetensors')}, fxtrain {fx.__version__}")
    print(f"checkpoints in {root}: {filesystem(root)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,400,1300", help="total state sizes in MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (a fresh folder inside it)")
    parser.add_argument("--smoke", action="store_true", help="one quick round at 1 MB")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    if args.smoke:
        args.rounds, sizes = 1, [1.0]
    root = Path(tempfile.mkdtemp(prefix="fxtrain-ckpt-bench-", dir=args.dir))
    header(root)
    results = {}
    try:
        if not args.smoke:  # imports, orbax's and jax's start-up, thread pools
            measure(1.0, 1, root / "warmup")
        for megabytes in sizes:
            bench = measure(megabytes, args.rounds, root / f"{megabytes:g}MB")
            report(megabytes, bench, args.rounds)
            shutil.rmtree(root / f"{megabytes:g}MB")
            results[megabytes] = {k: statistics.median(v) for k, v in bench.times.items()}
            del bench
            gc.collect()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
