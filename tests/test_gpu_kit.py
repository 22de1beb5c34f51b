"""The GPU kit (scripts/gpu.sh, benchmarks/gpu_transformer.py) on the CPU: every stage runs at a
tiny size, so the kit cannot rot between the draws that lend a GPU machine; and the arithmetic
its figures rest on (FLOPs per token, the batch that fits, which attention kernel ran, the
targets' verdicts)."""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_benchmarks import imported

ROOT = Path(__file__).resolve().parents[1]
# all but fx_graphed (CUDA only) and fx_remat_chunked (fx_remat's step with fx_chunked's loss,
# both run here; its losses and gradients are the fast tests' below): each costs a compile
ALL = ["loop", "fx_func", "fx_autograd", "fx_k", "fx_remat", "fx_chunked", "hf_trainer"]
BENCH_STAGES = ["core", "paths", "dropout", "hf", "chunked"]


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
    for variant in ("loop", "fx_func", "fx_autograd", "fx_remat", "fx_chunked"):  # the CPU's
        assert rows[variant]["attention"] == "flash", (variant, rows[variant])
    assert any("fx.fit's attention kernel: flash" in line for line in record["targets"])
    assert len(record["against_full_logits"]) == 1 and record["chunk"] == 64  # fx_chunked's
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


def test_a_variant_out_of_memory_runs_again_at_half_the_batch(kit, monkeypatch):
    """The probe leaves ``args.batch`` a string (as the children's argv takes it): found on
    the H200, where a variant out of memory at batch 120 ended the stage with a TypeError."""
    asked = []

    def child(variant, argv, fresh):
        batch = int(argv[argv.index("--batch") + 1])
        asked.append((variant, batch))
        return {"variant": variant, "oom": batch} if batch > 30 else {
            "variant": variant, "batch": batch, "tokens_per_s": 1.0, "peak_bytes": 1.0,
            "first_step_s": 1.0, "attention": "flash"}

    monkeypatch.setattr(kit, "run_child", child)
    monkeypatch.setattr(kit, "combined", lambda rows: rows[-1])
    args = argparse.Namespace(variants=["fx_func"], device="cuda", rounds=1, tiny=False,
                              batch="120", dropout=[0.1])
    rows = kit.measure_dropout(args, [])
    assert asked == [("fx_func", 120), ("fx_func", 60), ("fx_func", 30)]
    assert rows["fx_func"]["batch"] == 30


def test_without_drops_an_option_and_its_values(kit):
    argv = ["--dropout", "0", "0.1", "--tiny", "--batch", "auto", "--steps", "3"]
    assert kit.without(argv, "--dropout", "--batch") == ["--tiny", "--steps", "3"]


# -- the chunked loss's variants and stage ------------------------------------------------------


def stage_argv(stage: str) -> list[str]:
    """The arguments scripts/gpu.sh's benchmark ``stage`` gives gpu_transformer.py."""
    script = (ROOT / "scripts" / "gpu.sh").read_text()
    found = re.search(rf"^ *{stage}\) bench {stage} (.+?) ;;$", script, re.MULTILINE)
    assert found, f"no benchmark stage {stage} in scripts/gpu.sh"
    return shlex.split(found.group(1))


@pytest.mark.parametrize("stage", BENCH_STAGES)
def test_each_benchmark_stage_gives_arguments_the_benchmark_takes(kit, stage):
    """As on the GPU (``--device cuda``: the batch stays ``auto``, the probe's), and the stage
    is named where the script lists its stages."""
    args = kit.arguments([*stage_argv(stage), "--device", "cuda"])
    assert args.batch == "auto" and args.steps == 20 and args.warmup == 5
    assert args.variants[0] == "loop"  # every ratio is to the loop of the same run
    script = (ROOT / "scripts" / "gpu.sh").read_text()
    assert re.search(rf"^#   {stage} +\S", script, re.MULTILINE)
    assert stage in re.search(r"unknown stage .*\((.*)\)", script).group(1).split()


def test_the_chunked_stage_runs_both_chunked_variants_against_its_own_loop(kit):
    args = kit.arguments([*stage_argv("chunked"), "--device", "cuda"])
    assert args.variants == ["loop", "fx_chunked", "fx_remat_chunked"]
    assert args.model == "nano" and args.dropout == [0.0] and args.chunk == 16384


def test_the_chunked_variants_are_nanogpts_only(kit):
    """They take the hidden states from nanogpt.GPT (``head=False``): left out of ``--model
    hf``'s default variants, refused when named."""
    assert set(kit.CHUNKED) <= set(kit.arguments(["--device", "cpu"]).variants)
    hf = kit.arguments(["--model", "hf", "--device", "cpu"]).variants
    assert not set(kit.CHUNKED) & set(hf) and "hf_trainer" in hf
    with pytest.raises(SystemExit):
        kit.arguments(["--model", "hf", "--variants", "fx_chunked", "--device", "cpu"])


def tiny_args(kit, precision):
    imported("nanogpt")  # gpu_transformer imports it by name when it runs
    args = kit.arguments(["--device", "cpu", "--tiny", "--precision", precision])
    args.batch = int(args.batch)
    assert args.batch * (args.seq - 1) > 3 * args.chunk  # several chunks, the last one short
    return args


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("variant", ["fx_chunked", "fx_remat_chunked"])
def test_a_chunked_variant_trains_as_its_variant_with_the_whole_logits(kit, variant, precision):
    """Two steps of the tiny model from the same initial state, eager: the chunked loss's
    values are the whole logits' (the same next-token targets, the tied head), within float32
    rounding, or bfloat16's under autocast."""
    args = tiny_args(kit, precision)
    batches = kit.batches_of(args, "cpu", n=2)

    def losses(name):
        state, step, _ = kit.train_step_of(name, kit.model_of(args), args)
        out = []
        for ids in batches:
            state, metrics = step(state, ids)
            out.append(metrics["loss"])
        return torch.stack(out)

    expected = losses(kit.CHUNKED[variant])
    tolerance = 1e-5 if precision == "32" else 2e-2
    torch.testing.assert_close(losses(variant), expected, rtol=tolerance, atol=tolerance)


def test_the_chunked_loss_has_the_whole_logits_gradients(kit):
    """At the initial state, float32: every parameter's gradient, the tied embedding's (the
    head's share and the lookup's) included."""
    args = tiny_args(kit, "32")
    ids = kit.batches_of(args, "cpu", n=1)[0]
    state = kit.train_step_of("fx_func", kit.model_of(args), args)[0]

    def grads(variant):
        loss_fn = kit.loss_of(variant, args)

        def value(params):
            loss = loss_fn(state, params, ids)
            return getattr(loss, "value", loss)  # the chunked loss is an fx.losses.Mean

        return torch.func.grad(value)(state.params)

    got, expected = grads("fx_chunked"), grads("fx_func")
    assert "wte.weight" in got and "lm_head.weight" not in got  # tied: one tensor
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_chunked_variants_targets_and_comparisons(kit):
    rows = {"fx_chunked": {"tokens_vs_loop": 0.98, "memory_vs_loop": 0.3, "tokens_per_s": 98.0,
                           "peak_bytes": 3.0, "attention": "cudnn"},
            "fx_remat_chunked": {"tokens_vs_loop": 1.1, "memory_vs_loop": 0.2,
                                 "tokens_per_s": 110.0, "peak_bytes": 2.0},
            "fx_remat": {"tokens_vs_loop": 1.2, "memory_vs_loop": 0.68, "tokens_per_s": 120.0,
                         "peak_bytes": 6.8}}
    record = {"dropouts": {"0.0": rows}}
    lines = kit.targets(record)
    assert "dropout 0.0: fx.fit + chunked loss tokens/s 0.98x the loop (target >= 1.0x): " \
           "NOT met" in lines
    assert "dropout 0.0: fx.fit + chunked loss peak memory 0.30x the loop (target <= 1.0x): " \
           "met" in lines
    assert "dropout 0.0: fx.remat per block + chunked loss peak memory 0.20x the loop " \
           "(target <= 0.5x): met" in lines
    assert "dropout 0: fx.fit's attention kernel: cudnn (target: flash or efficient kept): " \
           "met" in lines
    assert len(lines) == 5
    assert kit.against_full_logits(record) == [
        ("dropout 0.0: fx_func not in this run: compare fx_chunked's ratios to the loop "
         "with fx_func's from another run (the kit's core stage)"),
        ("dropout 0.0: fx_remat_chunked against fx_remat (the whole logits): tokens/s 0.92x, "
         "peak memory 0.29x")]
