"""Where the suite's CPU goes: run the suite with FXTRAIN_TEST_CPU=FILE, then
`python scripts/test_cpu.py FILE [N]` prints the total and the N costliest tests and files, and
how long each pytest-xdist worker sat idle at the end while the other finished (the tail that
a long test started late adds to the wall time)."""

import collections
import json
import sys


def main(path: str, n: int = 25) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    total = sum(r["cpu_s"] for r in rows)
    by_file = collections.Counter()
    for r in rows:
        by_file[r["test"].split("::")[0]] += r["cpu_s"]
    print(f"{len(rows)} tests, {total:.0f} CPU seconds")
    for r in sorted(rows, key=lambda r: -r["cpu_s"])[:n]:
        print(f"{r['cpu_s']:8.1f}  {r['test']}")
    print()
    for name, seconds in by_file.most_common(n):
        print(f"{seconds:8.1f}  {name}")
    if rows and "end" in rows[0]:
        _tail(rows)


def _tail(rows: list) -> None:
    start = min(r["start"] for r in rows)
    last = {}
    for r in rows:
        last[r["worker"]] = max(last.get(r["worker"], 0.0), r["end"])
    end = max(last.values())
    print(f"\nwall {end - start:.0f} s from the first test's start to the last test's end")
    for worker, t in sorted(last.items()):
        print(f"  {worker} done at {t - start:.0f} s, then idle {end - t:.0f} s")
    print("the last tests to finish:")
    for r in sorted(rows, key=lambda r: -r["end"])[:5]:
        print(f"  {r['start'] - start:6.0f} s -> {r['end'] - start:6.0f} s  {r['worker']}  "
              f"{r['test']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
