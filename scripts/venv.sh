#!/usr/bin/env bash
# Makes .venv for fxtrain with the extra named (demo, test, ...) on the newest Python 3.11 or later
# on PATH (PYTHON=/path/to/python to choose: scripts/python.sh): torch pinned to 2.13.0, installed
# by pip (on Python 3.11 pip finds its CPU build on this machine's disk; elsewhere it downloads
# torch's build for the platform, on Linux a CUDA build of about 3 GB that also runs on the CPU),
# then fxtrain and the extra's packages installed by uv, which downloads and unpacks them in
# parallel: 23 s against pip's 78 s for the test extra, the same versions (pip freeze identical).
# --compile-bytecode writes the .pyc files pip would have written; where PYTHONDONTWRITEBYTECODE
# is set, every process would otherwise compile them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/python.sh)
"$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip uv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[$1]"
