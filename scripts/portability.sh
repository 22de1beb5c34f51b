#!/usr/bin/env bash
# Reruns the numerically sensitive test files under each CPU kernel set this machine can run,
# the nearest thing here to another CPU of our kind: ATen's (and Inductor's) vector ISA through
# ATEN_CPU_CAPABILITY, and, for the scalar set, MKL's and oneDNN's portable code paths too.
# Each kernel set gets its own TORCHINDUCTOR_CACHE_DIR: a cache shared across sets loads one
# set's compiled kernels under another (a crash, or compiled dropout masks unlike eager ones).
# Usage: bash scripts/portability.sh [pytest args...]   (needs the .venv scripts/test.sh makes)
set -uo pipefail
cd "$(dirname "$0")/.."
files=(tests/unit/test_step_reference.py tests/unit/test_optim.py tests/unit/test_optim_breadth.py
       tests/unit/test_optim_more.py tests/unit/test_precision.py tests/unit/test_random.py
       tests/unit/test_random_ops.py tests/unit/test_step.py tests/unit/test_remat.py
       tests/unit/test_torch_checkpoint.py
       tests/unit/test_demo.py::test_transformer_demo_generates_from_the_trained_module_and_exports_its_weights)
sets=("default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41" "avx2")
grep -qw avx512f /proc/cpuinfo 2>/dev/null && sets+=("avx512")
status=0
for set in "${sets[@]}"; do
    read -r capability extra <<<"$set"
    cache=$(mktemp -d -t "fxtrain-inductor-$capability-XXXX")
    echo "=== ATEN_CPU_CAPABILITY=$capability ${extra:-} (Inductor cache $cache)"
    start=$SECONDS
    env ATEN_CPU_CAPABILITY="$capability" $extra TORCHINDUCTOR_CACHE_DIR="$cache" \
        .venv/bin/python -m pytest -q -p no:cacheprovider "${files[@]}" "$@" || status=1
    echo "=== $capability: $((SECONDS - start)) s"
    rm -rf "$cache"
done
exit $status
