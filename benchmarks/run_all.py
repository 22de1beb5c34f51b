"""Runs every benchmark in this folder, then rewrites RESULTS.md and results.png from the results.

Each script runs in its own process, one after the other (so JAX's thread settings, Dynamo's
caches and the checkpoint files of one never touch another); its ``main(argv)`` returns its
results, which come back as JSON. The report (report.py) is written from those results and a
description of the machine; results.json keeps them, so ``--report-only`` can rewrite the report
without measuring again.

Run: .venv/bin/python benchmarks/run_all.py [--smoke] [--out DIR] [--report-only]
(the full run took 5.5 minutes on a quiet 2-core machine; --smoke runs every script with its
own --smoke in well under a minute; --out defaults to this folder).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> the arguments of its full run; each script's own --smoke replaces them under --smoke
BENCHMARKS = {
    "peers": ["--rounds", "5", "--steps", "1000"],
    "step_overhead": ["--rounds", "7", "--steps", "300"],
    "checkpoint": ["--sizes", "10,400,1300", "--rounds", "3"],
    "distributed": ["--rounds", "3", "--steps", "300"],
    "memory": ["--width", "2048", "--depths", "6", "12"],
    "compile_time": ["--rounds", "1"],
}
PACKAGES = ("torch", "fxtrain", "pytorch-lightning", "pytorch-ignite", "jax", "jaxlib", "optax",
            "orbax-checkpoint", "safetensors", "tqdm", "rich")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """The machine, the software and the moment, for the report's header."""
    from common import cpu_model, filesystem

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(memory, 1), "os": platform.platform(),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in PACKAGES},
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_before": os.getloadavg(), "temp_fs": filesystem(Path(tempfile.gettempdir()))}


def run_child(name: str, argv: list[str]) -> dict:
    """``benchmarks/<name>.py``'s ``main(argv)`` in a fresh process; its results, and how long
    it took (or why it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                               str(out), *argv], cwd=HERE.parent)
        seconds = time.perf_counter() - start
        if done.returncode:
            return {"argv": argv, "seconds": seconds,
                    "failed": f"exit code {done.returncode} (its output is above)"}
        return {"argv": argv, "seconds": seconds, "results": json.loads(out.read_text())}


def child(name: str, out: str, argv: list[str]) -> None:
    """In the child process: runs the script's main and writes what it returns as JSON."""
    sys.path.insert(0, str(HERE))
    results = importlib.import_module(name).main(argv)
    Path(out).write_text(json.dumps(results))


def arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every script with its --smoke")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md, results.png "
                        "and results.json go (default: this folder)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and results.png from --out's results.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the benchmarks (unless --report-only) and writes the report; returns the record:
    ``{"machine", "command", "seconds", "benchmarks": {name: {"argv", "seconds", "results" or
    "failed"}}}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], argv[3:])
    args = arguments(argv)
    sys.path.insert(0, str(HERE))
    import report

    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        record = json.loads((args.out / "results.json").read_text())
    else:
        record = {"machine": machine(), "smoke": args.smoke,
                  "command": " ".join([".venv/bin/python benchmarks/run_all.py", *argv]),
                  "benchmarks": {}}
        start = time.perf_counter()
        for name, full in BENCHMARKS.items():
            print(f"\n=== {name} {' '.join(['--smoke'] if args.smoke else full)}", flush=True)
            record["benchmarks"][name] = run_child(name, ["--smoke"] if args.smoke else full)
        record["seconds"] = time.perf_counter() - start
        record["machine"]["load_after"] = os.getloadavg()
        (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    report.write(record, args.out)
    print(f"\nwrote {args.out / 'RESULTS.md'} and {args.out / 'results.png'} "
          f"({record['seconds'] / 60:.1f} min of benchmarks)")
    return record


if __name__ == "__main__":
    done = main()
    failed = [n for n, b in (done or {}).get("benchmarks", {}).items() if "failed" in b]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
