#!/usr/bin/env bash
# The GPU kit: one command per stage that turns a lent GPU machine (Python 3.12, torch 2.11, no
# package registry) into figures.  bash scripts/gpu.sh OUT [STAGE...]
#
# Here, once (pip reaches a registry here, not there; the folder is git-ignored, ~3 MiB):
#   .venv/bin/python scripts/gpu_wheels.py download .gpu-wheels
# There, through the device tool (carry: [".gpu-wheels"]; OUT is the tool's $OUT; the tree
# travels without .git, so name the commit):
#   FXTRAIN_GPU_COMMIT=<sha> bash scripts/gpu.sh $OUT          # setup env hardware core
#   FXTRAIN_GPU_COMMIT=<sha> bash scripts/gpu.sh $OUT llama    # then one stage a call
#   FXTRAIN_GPU_COMMIT=<sha> bash scripts/gpu.sh $OUT defaults # or fxtrain's defaults, one call
# Only $OUT comes back. Each benchmark stage writes OUT/<stage>.md, a section for
# benchmarks/gpu/RESULTS.md (when, the device, driver, torch, commit, the command, the table,
# the targets); it is appended to $FXTRAIN_GPU_RESULTS on the machine (default
# benchmarks/gpu/RESULTS.md, lost with the machine), so append it here too:
#   cat <the fetched OUT>/<stage>.md >> benchmarks/gpu/RESULTS.md
#
# Stages, in the order given (the default is the first four; the estimates below):
#   setup     the carried wheels and fxtrain from this tree into $FXTRAIN_GPU_SITE
#             (/tmp/fxtrain-gpu-site), then scripts/gpu_wheels.py check: every dependency at a
#             version pyproject allows. Always run first, whether named or not.
#   env       the device, driver, torch, CUDA, Python and the packages the benchmark uses
#   hardware  the tests marked `hardware` (pytest -m hardware): GPU-only checks CI cannot run
#   core      gpu_transformer.py, GPT-2 124M: the fair loops (loop: the loss inside the
#             compiled module; loop_step: the whole step under one torch.compile), fx.fit
#             (func), then the pre-issue-58 loop with the loss outside the compiled module
#             (loop_eager_loss, an extra row, last: the first cut when time runs out)
#   llama     the Llama-shaped 1B, sequence 2048: loop, loop in fp8 (torchao's recipe),
#             loop_step, fx.fit, fx.fit in fp8 (fx.precision.float8), then fx.fit with fx.remat
#             per block and the chunked loss at a batch the loop cannot hold; each fp8 row's
#             tokens/s and peak over its bf16-mixed row's (the same run and batch). Without
#             torchao (a pinned wheel of scripts/gpu_wheels.py) the fp8 rows say "torchao not
#             installed". Cold compiles are long: rows finished are kept; to finish on the warm
#             machine, FXTRAIN_GPU_KIT_ARGS="--variants <the rest>" bash scripts/gpu.sh $OUT llama
#             (an fp8 row runs after its variant's)
#   fp8       the Llama 1B at batch 4 (no probe), each row in bf16-mixed and in fp8: fx.fit over
#             fx.regional (the float8 policy compiled, each block once: short enough to share a
#             call) and fx.fit over fx.shard's per-block units on a one-rank group, eager, its
#             fp8 row gathering the weights in float8 (enable_fsdp_float8_all_gather); each fp8
#             row's tokens/s and peak over its bf16 row's. The whole model compiled in fp8 is
#             llama's fx_func:fp8 row
#   regional  GPT-2 124M at batch 8: torch's regional recipe (loop_regional: each block
#             compiled, the loss in the model, fused AdamW) against fx.regional (fx_regional):
#             the first step (compiling) and tokens/s (the steady step), each with its target
#             (issue 77: first step <= 1.0x the recipe's, tokens/s >= 1.0x)
#   demo      fxtrain demo --model transformer, its default flags (1000 steps; the precision it
#             picks here, native_bf16(): bf16-mixed where the GPU computes bfloat16) to its
#             target (docs/demo.md states none of the transformer's own, none for a GPU: its
#             reference run's 2.76 bits per character): held-out loss, finite or not, steps/s,
#             precision, device; stopped after 240 s. The demo trains where it builds its model,
#             the host's CPU (fxtrain demo has no device flag): the device column says so
#   chunked   the loop, fx.fit with the whole logits, with Liger's fused linear cross-entropy
#             (fx_liger) and with fxtrain's own chunked kernel (fx_chunked): the chunked
#             loss against the whole-logits step (target >= 0.95x its tokens/s, <= 0.5x its peak)
#   remat     the loop, fx.fit with fx.remat per block, and with the chunked loss too
#   paths     the loop, fx.fit autograd, cuda_graphed, K steps per call
#   dropout   the fair loops and fx.fit with dropout 0.1 (keyed dropout against torch's own)
#   hf        transformers' GPT2LMHeadModel: the fair loops, fx.fit, HF Trainer with torch_compile
#   defaults  what users run by default, in one call: env, demo, regional, fp8 (the demo at its
#             default precision, the regional recipe against fx.regional, the float8 policy and
#             its all-gather against bf16 on the Llama 1B); OUT/summary.md gathers every stage's
#             exit, seconds and section
# Time, device seconds on a cold machine, estimated: a benchmark row is its process's first step
# (compiling) + ~20 s (imports, the model, 25 steps, the profiled step). Measured on the H200
# (torch 2.11, benchmarks/gpu/RESULTS.md): GPT-2's first step 22 s for the eager-loss loop,
# 103-131 s for fx.fit's variants. Never run, taken as: the loop with its loss inside 25 s,
# loop_step 60 s; the Llama 1B 1.5x GPT-2's (16 layers, 146 tensors against 12 and 148: loop
# 50 s, loop_step 100 s, fx.fit 155-190 s); fp8 1.3x its bf16 row (torchao's casts and scales
# around 112 linear layers); a probe 45 s (GPT-2) or 70 s (Llama); the demo ~120 s (docs/demo.md:
# 86-118 s for 1000 steps on 2 CPU cores in float32; here 16 cores in bf16-mixed, slower where
# the CPU emulates bfloat16). Hardware's 9 tests: 70-220 s in the 2026-11-26 run, taken as 120.
#   setup 20   env 5   hardware 120   demo 120 (at most 240)
#   fp8 300 (fx_regional 100 and its fp8 row 130: one block compiled, taken as 0.45x fx.fit's
#     whole model, as on the CPU at 12-24 layers; fx_shard 30 and its fp8 row 40: eager)
#   regional 115 (loop_regional 30: one block compiled, AdamW fused; fx_regional 85)
#   core 340 (probe 45, loop 45, loop_step 80, fx_func 125, loop_eager_loss 45)
#   llama 1010 (probe 70, loop 70, loop:fp8 85, loop_step 120, fx_func 190, fx_func:fp8 240,
#     fx_remat_chunked 235 at the larger batch): two calls
#   chunked 460   remat 380   paths 600   dropout 300   hf 380
# Every stage: ~4,100 s (~69 min), six sessions of 15 device minutes or more; one command may run
# 10 minutes (the device tool's limit). The one-call form: defaults, ~560 s (setup, env, demo,
# regional, fp8) within this script's 570 s deadline (a stage cut off keeps its finished rows); with the machine's start (~2-3 minutes) ~12 minutes
# of device time, within the 13 a session can spend on it. The first call's default (setup env
# hardware core) ~485 s.
# A benchmark stage asks the batch of the loop (the probe, its compiled steps at batch 2 and
# 4) once per model, sequence, precision and dropout on a machine: later stages read it from
# $FXTRAIN_GPU_CACHE (/tmp/fxtrain-gpu-cache). Cold compiles on the H200 took 22 s for the
# loop's first step and 106-131 s for fx.fit's; a warm machine reads Inductor's cache.
# Each benchmark stage writes OUT/<stage>.json and OUT/<stage>.md; every stage's output goes to
# OUT/run.log (and the screen), the hardware tests' to OUT/hardware.log.
# PYTHON picks the interpreter (default python3), FXTRAIN_GPU_WHEELS the wheel folder (default
# .gpu-wheels); FXTRAIN_GPU_KIT_ARGS adds arguments to every benchmark stage (the suite's smoke
# test: "--device cpu --tiny"; a later --variants replaces the stage's); FXTRAIN_GPU_STAGE_TIMEOUT
# (seconds, default 540) ends a stage that hangs, and the next one still runs;
# FXTRAIN_GPU_DEADLINE (seconds, default 570) bounds the whole command, within the device tool's
# 10 minutes: a stage gets what is left, and none starts with under a minute left. A benchmark
# stage cut off keeps the rows it finished in OUT/<stage>.json and OUT/<stage>.md.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n '2,/^set /p' "$0" | sed '$d' >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(env hardware core)
for i in "${!stages[@]}"; do  # defaults: the one-call form
    [[ ${stages[$i]} == defaults ]] && stages[i]="env demo regional fp8"
done
read -r -a stages <<< "${stages[*]}"
python=${PYTHON:-python3}
site=${FXTRAIN_GPU_SITE:-/tmp/fxtrain-gpu-site}
carried=${FXTRAIN_GPU_WHEELS:-.gpu-wheels}
limit=${FXTRAIN_GPU_STAGE_TIMEOUT:-540}
deadline=${FXTRAIN_GPU_DEADLINE:-570}
results=${FXTRAIN_GPU_RESULTS:-benchmarks/gpu/RESULTS.md}
commit=${FXTRAIN_GPU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')}
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
for name in ("fxtrain", "transformers", "accelerate", "triton", "liger-kernel", "torchao",
             "optree", "orbax-checkpoint"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} not installed")
EOF
}

hardware() {
    local files; files=$(grep -rl "mark.hardware" tests --include="test_*.py") || files=""
    [[ -n $files ]] || { echo "no test is marked hardware"; return 1; }
    # shellcheck disable=SC2086  # the file names have no spaces
    "$python" -m pytest -q -rA -p no:cacheprovider -m hardware $files 2>&1 \
        | tee "$out/hardware.log"
}

bench() {
    local stage=$1; shift
    FXTRAIN_GPU_COMMAND="bash scripts/gpu.sh \$OUT $stage${extra_args:+ (FXTRAIN_GPU_KIT_ARGS=\"$extra_args\")}" \
        PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_transformer.py "$@" "${extra[@]}" \
        --out "$out/$stage.json" --md "$out/$stage.md" --title "$stage"
}

run_stage() {
    case $1 in
        env) env_stage ;;
        hardware) hardware ;;
        core) bench core --variants loop loop_step fx_func loop_eager_loss --dropout 0 ;;
        llama) bench llama --model llama --variants loop loop_step fx_func fx_remat_chunked --fp8-variants loop fx_func --big-variants fx_remat_chunked --dropout 0 ;;
        fp8) bench fp8 --model llama --variants fx_regional fx_shard --fp8-variants fx_regional fx_shard --batch 4 --dropout 0 ;;
        regional) bench regional --variants loop_regional fx_regional --batch 8 --dropout 0 ;;
        demo) bench demo --demo transformer --demo-timeout $((stage_limit < 300 ? stage_limit - 60 : 240)) ;;
        chunked) bench chunked --variants loop fx_func fx_liger fx_chunked --dropout 0 ;;
        remat) bench remat --variants loop fx_remat fx_remat_chunked --dropout 0 ;;
        paths) bench paths --variants loop fx_autograd fx_graphed fx_k --dropout 0 ;;
        dropout) bench dropout --variants loop loop_step fx_func --dropout 0.1 ;;
        hf) bench hf --model hf --variants loop loop_step fx_func hf_trainer --dropout 0 ;;
        *) echo "unknown stage $1 (setup env hardware core llama fp8 regional demo chunked remat paths dropout hf defaults)"
           return 2 ;;
    esac
}

start=$SECONDS
ran=()
say "setup ($(date -u +%FT%TZ), fxtrain $commit)"
setup 2>&1 | tee -a "$log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { say "setup failed: stopping"; exit 1; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
for stage in "${stages[@]}"; do
    [[ $stage == setup ]] && continue
    begin=$SECONDS
    left=$((deadline - (SECONDS - start)))
    if [[ $left -lt 60 ]]; then
        say "$stage: not started, ${left} s left of the ${deadline} s deadline"; status=1
        ran+=("| $stage | not started (${left} s left) | 0 |"); continue
    fi
    stage_limit=$((left < limit ? left : limit))
    say "$stage (time limit $stage_limit s)"
    export -f env_stage hardware bench run_stage
    export python out extra_args="${FXTRAIN_GPU_KIT_ARGS:-}" FXTRAIN_GPU_COMMIT="$commit" stage_limit
    timeout "$stage_limit" bash -c 'read -r -a extra <<< "$extra_args"; run_stage "$0"' "$stage" \
        2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 0 ]] || status=1
    if [[ -f "$out/$stage.md" ]]; then  # the rows it finished, even when cut off
        { echo; cat "$out/$stage.md"; } >> "$results"
        say "$stage: its section appended to $results (only OUT comes back: append $stage.md there)"
    fi
    say "$stage: exit $rc, $((SECONDS - begin)) s"
    ran+=("| $stage | $rc | $((SECONDS - begin)) |")
done
say "all: $((SECONDS - start)) s"
{  # one summary of the call: each stage's exit and seconds, then the sections written
    echo "### GPU kit: $(date -u +%FT%TZ), fxtrain $commit, stages: ${stages[*]}"
    echo
    echo "| stage | exit | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${ran[@]}"
    echo
    echo "all: $((SECONDS - start)) s of the ${deadline} s deadline"
    for stage in "${stages[@]}"; do
        [[ -f "$out/$stage.md" ]] && { echo; cat "$out/$stage.md"; }
    done
} > "$out/summary.md"
say "summary: $out/summary.md"
exit $status
