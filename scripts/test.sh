#!/usr/bin/env bash
# Sets up a virtual environment (torch pinned to the CPU build) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh test
# fxtrain's bytecode, once: where PYTHONDONTWRITEBYTECODE is set (as on our dev machines) every
# process the suite starts would otherwise compile fxtrain's modules again (0.1 s each)
.venv/bin/python -m compileall -q fxtrain >/dev/null
# the Jupyter kernel the notebook tests execute in: this venv's Python
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fxtrain)" >/dev/null
# two workers (pytest-xdist): compiling is single-threaded, so one process leaves a core idle
exec .venv/bin/python -m pytest -q -n 2 --maxschedchunk 1 "$@"
