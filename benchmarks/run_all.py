"""Runs every benchmark in this folder, then rewrites RESULTS.md and results.png from the results.

Each script runs in its own process, one after the other (so JAX's thread settings, Dynamo's
caches and the checkpoint files of one never touch another, and no measurement shares the
machine; ``--smoke`` runs two at a time, as its numbers are not reported); its ``main(argv)``
returns its results, which come back as JSON. The report (report.py) is written from those results and a
description of the machine; results.json keeps them, so ``--report-only`` can rewrite the report
without measuring again.

Run: .venv/bin/python benchmarks/run_all.py [--smoke] [--out DIR] [--report-only]
[--only NAME[,NAME]] (--smoke runs every script with its own --smoke; --out defaults to this
folder; --only runs the named scripts and keeps the other entries of --out's results.json, and
the report says which were rerun, when).
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
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    "transformer": ["--depths", "2", "4", "--steps", "20", "--curve", "320"],
    "scale": ["--depths", "4", "8", "--steps", "3"],
    "lm": ["--docs", "128", "--ce-batch", "8", "--ce-steps", "1", "--variants", "padded", "packed",
           "plain", "chunked"],
}
SMOKE_JOBS = 2  # smoke runs side by side (the CI machine has 2 cores)
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


def run_child(name: str, argv: list[str], capture: bool = False) -> tuple[dict, str]:
    """``benchmarks/<name>.py``'s ``main(argv)`` in a fresh process: its entry (its results, and
    how long it took, or why it failed) and, with ``capture``, its output (else it is printed
    as it comes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                               str(out), *argv], cwd=HERE.parent, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
        seconds = time.perf_counter() - start
        if done.returncode:
            return {"argv": argv, "seconds": seconds,
                    "failed": f"exit code {done.returncode} (its output is above)"}, done.stdout
        return ({"argv": argv, "seconds": seconds, "results": json.loads(out.read_text())},
                done.stdout)


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
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        metavar="NAME[,NAME]", help="run these and keep the other results")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(BENCHMARKS)
    if unknown:
        parser.error(f"--only: no benchmark {', '.join(sorted(unknown))} (there are "
                     f"{', '.join(BENCHMARKS)})")
    return args


def run(names: list[str], smoke: bool) -> tuple[dict, float]:
    """Runs the named benchmarks in turn (smoke runs, which time nothing that is reported, two
    at a time, the longest first): their entries and the seconds it took."""
    entries, start = {}, time.perf_counter()
    if smoke:
        with ThreadPoolExecutor(SMOKE_JOBS) as pool:
            running = {pool.submit(run_child, name, ["--smoke"], True): name
                       for name in sorted(names, key=list(BENCHMARKS).index, reverse=True)}
            for done in as_completed(running):  # each one's output as soon as it ends
                entry, output = done.result()
                print(f"\n=== {running[done]} --smoke\n{output}", end="", flush=True)
                entries[running[done]] = entry
        return {name: entries[name] for name in names}, time.perf_counter() - start
    for name in names:
        print(f"\n=== {name} {' '.join(BENCHMARKS[name])}", flush=True)
        entries[name], _ = run_child(name, BENCHMARKS[name])
    return entries, time.perf_counter() - start


def rerun(record: dict, names: list[str], smoke: bool, argv: list[str]) -> dict:
    """``record`` with the named benchmarks run again; ``record["updates"]`` says when."""
    if smoke != record.get("smoke", False):
        sys.exit(f"--only{' --smoke' * smoke} would mix smoke and full results in one report; "
                 "use another --out")
    update = {"command": " ".join([".venv/bin/python benchmarks/run_all.py", *argv]),
              "benchmarks": names, "machine": machine()}
    entries, update["seconds"] = run(names, smoke)
    update["machine"]["load_after"] = os.getloadavg()
    earlier = [{**u, "benchmarks": [b for b in u["benchmarks"] if b not in names]}
               for u in record.get("updates", [])]  # their sections are this run's now
    return {**record, "benchmarks": {**record["benchmarks"], **entries},
            "updates": [*(u for u in earlier if u["benchmarks"]), update]}


def main(argv=None) -> dict:
    """Runs the benchmarks (unless --report-only) and writes the report; returns the record:
    ``{"machine", "command", "seconds", "benchmarks": {name: {"argv", "seconds", "results" or
    "failed"}}}``, and ``"updates"``: ``[{"command", "benchmarks", "machine", "seconds"}]`` for
    each --only run merged into it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], argv[3:])
    args = arguments(argv)
    sys.path.insert(0, str(HERE))
    import report

    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    if args.report_only:
        record = json.loads(saved.read_text())
    elif args.only and saved.exists():
        record = rerun(json.loads(saved.read_text()), args.only, args.smoke, argv)
    else:
        record = {"machine": machine(), "smoke": args.smoke,
                  "command": " ".join([".venv/bin/python benchmarks/run_all.py", *argv])}
        record["benchmarks"], record["seconds"] = run(args.only or list(BENCHMARKS), args.smoke)
        record["machine"]["load_after"] = os.getloadavg()
    if not args.report_only:
        saved.write_text(json.dumps(record, indent=1) + "\n")
    report.write(record, args.out)
    seconds = record["updates"][-1]["seconds"] if args.only and "updates" in record else \
        record["seconds"]
    print(f"\nwrote {args.out / 'RESULTS.md'} and {args.out / 'results.png'} "
          f"({seconds / 60:.1f} min of benchmarks)")
    return record


if __name__ == "__main__":
    done = main()
    failed = [n for n, b in (done or {}).get("benchmarks", {}).items() if "failed" in b]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
