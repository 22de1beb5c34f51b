"""One benchmark script on this tree and on another git revision, alternately, in one run.

A change to the core is measured against the code before it on the same machine, in the same
minutes: ``--repeat`` fresh processes of each tree, interleaved (base, this, base, this, ...),
each running ``benchmarks/SCRIPT`` of its own tree with its own ``fxtrain`` first on the path.
Every line of the script's output that reads ``<label> <number> ...`` (a variant and its rate,
as ``step_overhead.py`` prints them) is collected, and the medians are printed side by side
with their ratio (this tree over the base; for a rate, above 1 is faster).

Run: python benchmarks/against.py REV SCRIPT [--repeat 3] [-- SCRIPT's arguments]
  python benchmarks/against.py HEAD~3 step_overhead.py --repeat 3 -- --rounds 5 --steps 300
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\(?[A-Za-z][\w'()/ -]*?)\s+(\d+(?:\.\d+)?)(?:/s)?(?:\s|$)")


def rows(output: str, section: str = "") -> dict[str, float]:
    """``label -> number`` for each row of ``output``, labels prefixed with their section (the
    last line ending in ':' before them, as ``tiny: ...`` heads a table).

    Examples:
        >>> rows("tiny: MLP\\nd_fxtrain   6989  2.70x\\nlarge: MLP\\nd_fxtrain 156")
        {'tiny / d_fxtrain': 6989.0, 'large / d_fxtrain': 156.0}
    """
    out = {}
    for line in output.splitlines():
        head = re.match(r"^(\w[\w ,()'-]*?):", line)
        if head and not ROW.match(line):
            section = head.group(1).split(" (")[0]
            continue
        match = ROW.match(line)
        if match:
            label = match.group(1).strip()
            out[f"{section} / {label}" if section else label] = float(match.group(2))
    return out


def worktree(rev: str) -> Path:
    """A checkout of ``rev`` in a temporary folder (removed by ``git worktree prune``)."""
    folder = Path(tempfile.mkdtemp(prefix="fxtrain-against-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(folder),
                    rev], check=True, capture_output=True)
    return folder


def run(tree: Path, script: str, argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # its fxtrain before the installed one
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *argv], env=env,
                         cwd=tree, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{script} failed on {tree}:\n{out.stderr[-3000:]}")
    return out.stdout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the base revision (a commit, a tag, HEAD~3)")
    parser.add_argument("script", help="a script in benchmarks/ (step_overhead.py)")
    parser.add_argument("--repeat", type=int, default=3, help="processes of each tree")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []  # the script's own arguments
    args = parser.parse_args(argv[:len(argv) - len(rest) - ("--" in argv)])
    args.rest = rest
    base = worktree(args.rev)
    try:
        seen: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
        for i in range(args.repeat):
            for name, tree in (("base", base), ("this", ROOT)):
                for label, value in rows(run(tree, args.script, args.rest)).items():
                    seen[name].setdefault(label, []).append(value)
                print(f"round {i + 1}/{args.repeat}: {name} done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
    medians = {name: {k: statistics.median(v) for k, v in rows_.items()}
               for name, rows_ in seen.items()}
    print(f"\n{args.script} {' '.join(args.rest)}: medians of {args.repeat} processes each, "
          f"interleaved; base {args.rev}")
    print(f"{'row':60s} {'base':>10s} {'this':>10s} {'this/base':>10s}")
    for label in medians["base"]:
        if label in medians["this"]:
            b, t = medians["base"][label], medians["this"][label]
            print(f"{label:60s} {b:10.3f} {t:10.3f} {t / b if b else float('nan'):10.3f}")
    return medians


if __name__ == "__main__":
    main()
