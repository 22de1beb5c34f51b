#!/usr/bin/env bash
# Runs the test suite under another torch: bash scripts/compat.sh TORCH [PYTHON] [pytest args...]
#   bash scripts/compat.sh 2.11.0 python3.12              # the GPU machines' torch and Python
#   bash scripts/compat.sh 2.14.1 -- -m "not slow"         # the newest pip allows here, non-slow
# Makes .venv-torch$TORCH-py3.x (kept for the next call) with that torch from the package
# registry through uv, which reads no pip cap: torch's CUDA build for Linux, which runs on the
# CPU (about 3 GB, 2-3 minutes here), then fxtrain[test]; then the suite with `pytest -n 2`
# (the arguments after PYTHON, or after --, replace the default `tests`).
# FXTRAIN_COMPAT_SETUP_ONLY=1 makes the venv and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: bash scripts/compat.sh TORCH [PYTHON] [-- pytest args...]" >&2; exit 2; }
torch=$1; shift
python=""
if [[ $# -ge 1 && $1 != -* ]]; then python=$1; shift; fi
[[ ${1:-} == -- ]] && shift
python=$(PYTHON=$python bash scripts/python.sh)
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv=".venv-torch$torch-py$version"
if [[ ! -f "$venv/.fxtrain-ready" ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip uv
    # --compile-bytecode: the .pyc files pip would write (uv writes none by default), so that each
    # process the suite starts does not compile torch's and sympy's modules again (importing
    # torch, Dynamo and Inductor: 8.1 CPU-s without them, 3.9 with)
    "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" "torch==$torch"
    "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" -e ".[test]" "torch==$torch"
    "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 \
        --display-name "Python 3 (fxtrain, torch $torch)" >/dev/null
    touch "$venv/.fxtrain-ready"
fi
"$venv/bin/python" -c 'import sys, torch; print(f"torch {torch.__version__} on Python {sys.version.split()[0]}")'
[[ -n "${FXTRAIN_COMPAT_SETUP_ONLY:-}" ]] && exit 0
[[ $# -eq 0 ]] && set -- tests
"$venv/bin/python" -m compileall -q fxtrain >/dev/null  # fxtrain's bytecode for this Python, once
exec "$venv/bin/python" -m pytest -q -n 2 --maxschedchunk 1 "$@"
