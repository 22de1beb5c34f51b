#!/usr/bin/env bash
# Sets up a virtual environment (torch pinned to the CPU build) and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh demo
exec .venv/bin/fxtrain demo "$@"
