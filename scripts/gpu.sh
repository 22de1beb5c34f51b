#!/usr/bin/env bash
# The GPU kit: one command that turns a lent GPU machine (Python 3.12, torch 2.11, no package
# registry) into figures.  bash scripts/gpu.sh OUT [STAGE...]
#
# Here, once (pip reaches a registry here, not there; the folder is git-ignored, ~2 MiB):
#   .venv/bin/python scripts/gpu_wheels.py download .gpu-wheels
# There, through the device tool (carry: [".gpu-wheels"]; OUT is the tool's $OUT):
#   bash scripts/gpu.sh $OUT                      # setup env hardware core: about 6-8 minutes
#   bash scripts/gpu.sh $OUT paths                # then, with device time left: one stage a call
#   bash scripts/gpu.sh $OUT chunked              # the chunked loss: about 7-8 minutes
#
# Stages, in the order given (each fits one 10-minute command; the default is the first four):
#   setup     the carried wheels and fxtrain from this tree into $FXTRAIN_GPU_SITE
#             (/tmp/fxtrain-gpu-site), then scripts/gpu_wheels.py check: every dependency at a
#             version pyproject allows. Always run first, whether named or not.
#   env       the device, driver, torch, CUDA, Python and the packages the benchmark uses
#   hardware  the tests marked `hardware` (pytest -m hardware): GPU-only checks CI cannot run
#   core      gpu_transformer.py: the compiled nanoGPT-style loop, fx.fit (func), fx.fit with
#             fx.remat per block; dropout 0 (the issue's first targets)
#   paths     the loop, fx.fit autograd, cuda_graphed, K steps per call
#   dropout   the loop and fx.fit with dropout 0.1 (keyed dropout against torch's own)
#   hf        transformers' GPT2LMHeadModel: the loop, fx.fit, HF Trainer with torch_compile
#   chunked   the loop, fx.fit with the loss fx.losses.chunked_causal_lm (never the whole
#             logits), and that with fx.remat per block (remat's 0.5x memory target); fx.fit
#             and fx.remat with the whole logits are the core stage's (with them, five cold
#             compiles, 22 s for the loop's and 106-131 s or more each for fx's on the H200,
#             would not fit one stage's 540 s)
# Each benchmark stage writes OUT/<stage>.json; every stage's output goes to OUT/run.log (and
# the screen), the hardware tests' to OUT/hardware.log: at most 8 files, as the tool returns.
# PYTHON picks the interpreter (default python3), FXTRAIN_GPU_WHEELS the wheel folder (default
# .gpu-wheels); FXTRAIN_GPU_KIT_ARGS adds arguments to every
# benchmark stage (the suite's smoke test: "--device cpu --tiny"); FXTRAIN_GPU_STAGE_TIMEOUT
# (seconds, default 540) ends a stage that hangs, and the next one still runs;
# FXTRAIN_GPU_DEADLINE (seconds, default 570) bounds the whole command, within the device tool's
# 10 minutes: a stage gets what is left, and none starts with under a minute left. A benchmark
# stage cut off keeps the rows it finished in OUT/<stage>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n '2,/^set /p' "$0" | sed '$d' >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(env hardware core)
python=${PYTHON:-python3}
site=${FXTRAIN_GPU_SITE:-/tmp/fxtrain-gpu-site}
carried=${FXTRAIN_GPU_WHEELS:-.gpu-wheels}
limit=${FXTRAIN_GPU_STAGE_TIMEOUT:-540}
deadline=${FXTRAIN_GPU_DEADLINE:-570}
read -r -a extra <<< "${FXTRAIN_GPU_KIT_ARGS:-}"
log="$out/run.log"
status=0

say() { echo "=== $*" | tee -a "$log"; }

setup() {
    rm -rf "$site" && mkdir -p "$site"
    shopt -s nullglob; local wheels=("$carried"/*.whl); shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" "${wheels[@]}" || return 1
    else
        echo "no wheels carried in $carried (made here by scripts/gpu_wheels.py download)"
    fi
    # fxtrain itself, built from this tree with the setuptools the machine has (no registry)
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --target "$site" . || return 1
    rm -rf build fxtrain.egg-info
    PYTHONPATH="$site" "$python" scripts/gpu_wheels.py check
}

env_stage() {
    "$python" - <<'EOF'
import importlib.metadata as m, platform, subprocess, sys, torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm", "--format=csv"], capture_output=True,
                             text=True, timeout=30).stdout.strip())
    except OSError as e:
        print(f"nvidia-smi: {e}")
else:
    print("no CUDA device: torch sees none")
for name in ("fxtrain", "transformers", "accelerate", "triton", "optree", "orbax-checkpoint"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} not installed")
EOF
}

hardware() {
    local files; files=$(grep -l "mark.hardware" tests/test_*.py) || files=""
    [[ -n $files ]] || { echo "no test is marked hardware"; return 1; }
    # shellcheck disable=SC2086  # the file names have no spaces
    "$python" -m pytest -q -rA -p no:cacheprovider -m hardware $files 2>&1 \
        | tee "$out/hardware.log"
}

bench() {
    local stage=$1; shift
    PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_transformer.py "$@" "${extra[@]}" \
        --out "$out/$stage.json"
}

run_stage() {
    case $1 in
        env) env_stage ;;
        hardware) hardware ;;
        core) bench core --variants loop fx_func fx_remat --dropout 0 ;;
        paths) bench paths --variants loop fx_autograd fx_graphed fx_k --dropout 0 ;;
        dropout) bench dropout --variants loop fx_func --dropout 0.1 ;;
        hf) bench hf --model hf --variants loop fx_func hf_trainer --dropout 0 ;;
        chunked) bench chunked --variants loop fx_chunked fx_remat_chunked --dropout 0 ;;
        *) echo "unknown stage $1 (setup env hardware core paths dropout hf chunked)"
           return 2 ;;
    esac
}

start=$SECONDS
say "setup ($(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
setup 2>&1 | tee -a "$log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { say "setup failed: stopping"; exit 1; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
for stage in "${stages[@]}"; do
    [[ $stage == setup ]] && continue
    begin=$SECONDS
    left=$((deadline - (SECONDS - start)))
    if [[ $left -lt 60 ]]; then
        say "$stage: not started, ${left} s left of the ${deadline} s deadline"; status=1; continue
    fi
    say "$stage (time limit $((left < limit ? left : limit)) s)"
    export -f env_stage hardware bench run_stage
    export python out extra_args="${FXTRAIN_GPU_KIT_ARGS:-}"
    timeout "$((left < limit ? left : limit))" bash -c 'read -r -a extra <<< "$extra_args"; run_stage "$0"' "$stage" \
        2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 0 ]] || status=1
    say "$stage: exit $rc, $((SECONDS - begin)) s"
done
say "all: $((SECONDS - start)) s"
exit $status
