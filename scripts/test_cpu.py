"""Where the suite's CPU goes: run the suite with FXTRAIN_TEST_CPU=FILE, then
`python scripts/test_cpu.py FILE [N]` prints the total and the N costliest tests and files."""

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


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
