#!/usr/bin/env bash
# Sets up a virtual environment (torch pinned to the CPU build) and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[demo]"
exec .venv/bin/fxtrain demo "$@"
