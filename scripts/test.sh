#!/usr/bin/env bash
# Sets up a virtual environment (torch pinned to the CPU build) and runs the whole test suite, by
# kind: tests/unit (one process), tests/e2e (real processes, one rank), tests/ranks (2- and
# 4-rank jobs), tests/tools (benchmarks, the GPU kit, docs, notebooks), each folder's wall time
# printed against its budget (seconds on a quiet 2-core machine: docs/testing.md), all but the
# tests marked extended (our own tools run end to end: the benchmark scripts' smoke runs, the GPU
# kit's training runs), which `bash scripts/test.sh --extended` runs alone. Other arguments, when
# given, go to one pytest run instead (bash scripts/test.sh tests/unit -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh test
# fxtrain's bytecode, once: where PYTHONDONTWRITEBYTECODE is set (as on our dev machines) every
# process the suite starts would otherwise compile fxtrain's modules again (0.1 s each)
.venv/bin/python -m compileall -q fxtrain >/dev/null
# the Jupyter kernel the notebook tests execute in: this venv's Python
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fxtrain)" >/dev/null
# two workers (pytest-xdist): compiling is single-threaded, so one process leaves a core idle
pytest=(.venv/bin/python -m pytest -q -n 2 --maxschedchunk 1)
if [[ ${1:-} == --extended ]]; then
    shift
    exec "${pytest[@]}" -m extended "${@:-tests}"
fi
if [[ $# -gt 0 ]]; then
    exec "${pytest[@]}" "$@"
fi
status=0
over=()
for kind_budget in unit:460 e2e:360 ranks:700 tools:300; do
    kind=${kind_budget%%:*} budget=${kind_budget##*:}
    start=$SECONDS
    "${pytest[@]}" -m "not extended" "tests/$kind" || status=1
    took=$((SECONDS - start))
    echo "=== tests/$kind: $took s (budget $budget s)"
    [[ $took -le $budget ]] || over+=("tests/$kind $took s > $budget s")
done
[[ ${#over[@]} -eq 0 ]] || printf '=== over budget: %s\n' "${over[@]}"
exit $status
