#!/usr/bin/env bash
# Prints the Python the setup scripts use: $PYTHON when set, else the newest python3.1x (3.11 or
# later) on PATH that runs (a pyenv shim for a version that is not active exists but fails).
set -euo pipefail
if [[ -n "${PYTHON:-}" ]]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' >/dev/null \
        || { echo "PYTHON=$PYTHON is not a Python 3.11 or later" >&2; exit 1; }
    echo "$PYTHON"; exit 0
fi
for minor in 19 18 17 16 15 14 13 12 11; do
    if command -v "python3.$minor" >/dev/null 2>&1 && "python3.$minor" -c '' >/dev/null 2>&1; then
        echo "python3.$minor"; exit 0
    fi
done
echo "no Python 3.11 or later found on PATH (set PYTHON=/path/to/python3.x)" >&2
exit 1
