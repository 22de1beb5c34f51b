"""The GPU kit (scripts/gpu.sh, benchmarks/gpu_transformer.py) on the CPU: every stage runs at a
tiny size, so the kit cannot rot between the draws that lend a GPU machine; and the arithmetic
its figures rest on (FLOPs per token, the batch that fits, which attention kernel ran, the
targets' verdicts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmarks import imported

ROOT = Path(__file__).resolve().parents[1]
ALL = ["loop", "fx_func", "fx_autograd", "fx_k", "fx_remat", "hf_trainer"]  # all but fx_graphed


@pytest.fixture(scope="module")
def kit():
    return imported("gpu_transformer")


@pytest.mark.slow
def test_the_kit_runs_its_stages_end_to_end_at_a_tiny_size_on_the_cpu(tmp_path):
    """``bash scripts/gpu.sh OUT env hardware core`` as the GPU machine runs it (the setup
    installs fxtrain from this tree into a folder of its own and checks every dependency),
    with the benchmark at its tiny size over every variant the CPU has."""
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    (tmp_path / "wheels").mkdir()  # none carried: this Python has every dependency
    env = {**os.environ, "PYTHON": sys.executable, "FXTRAIN_GPU_SITE": str(tmp_path / "site"),
           "FXTRAIN_GPU_WHEELS": str(tmp_path / "wheels"),
           "FXTRAIN_GPU_KIT_ARGS": "--device cpu --tiny --variants " + " ".join(ALL)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu.sh"), str(out), "env",
                           "hardware", "core"], env=env, capture_output=True, text=True,
                          timeout=900)
    log = (out / "run.log").read_text()
    assert done.returncode == 0, log[-4000:] + done.stderr[-2000:]
    assert f"fxtrain 0.1.0 from {tmp_path / 'site' / 'fxtrain'}" in log  # the installed copy
    assert "ok optree" in log and "MISSING" not in log
    assert "=== env: exit 0" in log and "=== hardware: exit 0" in log
    assert "deselected" in (out / "hardware.log").read_text()  # the marked tests were collected
    record = json.loads((out / "core.json").read_text())
    rows = record["dropouts"]["0.0"]
    assert sorted(rows) == sorted(ALL)
    for variant, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["first_step_s"] > 0, (variant, row)
        assert row["bytes_per_param"] > 0 and "tokens_vs_loop" in row, (variant, row)
    for variant in ("loop", "fx_func", "fx_autograd", "fx_remat"):  # torch's CPU kernel
        assert rows[variant]["attention"] == "flash", (variant, rows[variant])
    assert any("fx.fit's attention kernel: flash" in line for line in record["targets"])
    assert record["environment"]["device"] == "cpu" and record["batch"] == 4


def test_flops_per_token_is_nanogpts_count_for_gpt2_124m(kit):
    GPT, Shape = imported("nanogpt").GPT, imported("nanogpt").Shape
    args = kit.arguments(["--device", "cpu", "--batch", "8"])
    model = GPT(Shape())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT2Config()'s
    # 6 x (124,439,808 less the 1024 x 768 position table) + 12 x 12 layers x 768 x 1024
    assert kit.flops_per_token(model, args) == 6 * 123_653_376 + 12 * 12 * 768 * 1024


def test_the_batch_that_fits_keeps_headroom_and_a_multiple_of_four(kit):
    gib = 2**30
    found = {"per_sequence": 2 * gib, "fixed": 3 * gib, "total": 80 * gib}
    assert kit.largest_batch(found) == 28  # (64 - 3) // 2 = 30, down to a multiple of 4
    assert kit.largest_batch({**found, "per_sequence": 100 * gib}) == 1


@pytest.mark.parametrize("names,kernels", [
    ({"aten::_scaled_dot_product_flash_attention",
      "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>"}, "flash"),
    ({"aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16_aligned_64x64"},
     "efficient"),
    ({"aten::_scaled_dot_product_cudnn_attention"}, "cudnn"),
    ({"aten::_scaled_dot_product_flash_attention_for_cpu"}, "flash"),
    ({"aten::bmm", "aten::_softmax", "triton_per_fused_softmax_3"}, "none"),
])
def test_the_attention_kernel_is_read_from_profiled_names(kit, names, kernels):
    assert kit.attention_kernels(names) == kernels


def test_targets_say_met_or_not_from_the_rows(kit):
    row = {"tokens_vs_loop": 1.02, "memory_vs_loop": 0.9, "attention": "flash"}
    record = {"dropouts": {"0.0": {"fx_func": row, "fx_remat": {"memory_vs_loop": 0.55}},
                           "0.1": {"fx_func": {**row, "tokens_vs_loop": 0.85,
                                               "attention": "none"}}}}
    lines = kit.targets(record)
    assert "dropout 0.0: fx.fit tokens/s 1.02x the loop (target >= 1.0x): met" in lines
    assert "dropout 0.0: fx.remat per block peak memory 0.55x the loop (target <= 0.5x): " \
           "NOT met" in lines
    assert "dropout 0.1: fx.fit tokens/s 0.85x the loop (target >= 0.9x): NOT met" in lines
    assert any(line.startswith("dropout 0: fx.fit's attention kernel: flash") and
               line.endswith(": met") for line in lines)
    assert len(lines) == 6  # no attention target at dropout 0.1


def test_a_failed_or_out_of_memory_variant_is_a_row_not_the_end(kit):
    rows = {"loop": {"tokens_per_s": 100.0, "peak_bytes": 10.0, "params": 1,
                     "flops_per_token": 6.0, "batch": 8, "attention": "flash",
                     "first_step_s": 1.0},
            "fx_func": {"variant": "fx_func", "oom": 8},
            "fx_k": {"variant": "fx_k", "error": "Traceback ...\nRuntimeError: boom"}}
    kit.ratios(rows, peak_tf=1e-9)
    assert rows["loop"]["mfu"] == pytest.approx(100.0 * 6.0 / 1e3)
    table = kit.markdown({"dropouts": {"0.0": rows}})
    assert "out of memory at batch 8" in table and "RuntimeError: boom" in table


def test_without_drops_an_option_and_its_values(kit):
    argv = ["--dropout", "0", "0.1", "--tiny", "--batch", "auto", "--steps", "3"]
    assert kit.without(argv, "--dropout", "--batch") == ["--tiny", "--steps", "3"]
