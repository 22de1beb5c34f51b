"""Cold and warm compile time of a training step: fxtrain's against torch.compile of the model.

Each variant trains the same model (a 2-layer GPT-2 from transformers by default: ``n_layer=2,
n_head=2, n_embd=64, vocab_size=256, n_positions=64``, eager attention, batch 8 x 64 tokens,
AdamW with lr 1e-3 and weight decay 1e-2) and runs in its own fresh process:

- fxtrain: ``torch.compile(fx.make_train_step(loss_fn), fullgraph=True)`` over
  ``fx.TrainState.create(model, fx.optim.adamw(1e-3))``, with GPT-2's dropout (0.1), and again
  with dropout 0.0 (and, on request, with ``fx.optim.sgd``: the optimizer's share);
- the baseline, torch.compile(model) + ``torch.optim.AdamW`` whose ``step()`` is compiled too
  (the recipe of PyTorch's compiled-optimizer tutorial); the same with an eager ``step()``, and
  the baseline with dropout 0.0;
- fxtrain's step not compiled (``fxtrain_eager``), for the break-even of compiling: the run
  length (in steps) from which the compiled step, its compiling first step included, has taken
  less time than the eager one, on a cold and on a warm cache. ``--kinds gpt2 mlp`` (the
  default) measures that on the small MLP of ``--smoke`` too (fxtrain compiled and eager only).

Cold: the process starts with an empty ``TORCHINDUCTOR_CACHE_DIR`` of its own, so nothing is
cached. Warm: a second process of the same variant reuses that directory
(``fxtrain_precompiled``: an empty one of its own and the cold process's ``fx.precompiled``
file, all a warm start has) (Inductor's FX graph cache and AOTAutograd's cache hit; Dynamo
traces again). Each process reports its imports
(torch, transformers, fxtrain), its first step from before the call to the end of the step
(compilation included) in wall time and in CPU time of the process and its compile workers
(steadier than wall time on a shared machine), how long after its start it was ready (first step
done), ``torch._dynamo.utils.compile_times`` summed per phase, the graphs Dynamo made, Inductor's
generated kernels, the C++ sources in its cache directory, and a steady step's time (the median
of the steps it takes in the second after the first, 3 to 200 of them). Rounds
rotate the order of the variants; the table shows medians, and ratios against the baseline in the
same mode (cold or warm).

Needs transformers (fxtrain[hf]) and, for the CPU times, psutil (fxtrain[monitor]).

Where a variant runs cold and warm, a last table sets its warm first step against its cold one
(``--each-kind``: every kind of ``--kinds`` with ``--variants``, e.g. ``--kinds gpt2 mlp
--each-kind --variants fxtrain_precompiled --warm fxtrain_precompiled``, issue 62's table).

Run: .venv/bin/python benchmarks/compile_time.py [--rounds 1] [--variants ...] [--out FILE]
     [--kinds gpt2 mlp] [--each-kind] [--smoke]
     (--smoke: the small MLP with dropout instead of GPT-2, fxtrain's variants and the baseline
     only: about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LR, WD = 1e-3, 1e-2
GPT2 = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64)
BATCH, TOKENS = 8, 64
BASELINE = "torch_compiled_adamw"
VARIANTS = {
    "fxtrain": "fxtrain step, dropout 0.1",
    "fxtrain_nodropout": "fxtrain step, dropout 0.0",
    "torch_compiled_adamw": "torch.compile(model) + compiled AdamW.step()",
    "torch_regional": "torch's regional recipe: block.compile() for each GPT-2 block "
                      "(torchtitan's apply_compile), the loss in the model, compiled AdamW.step()",
    "torch_eager_adamw": "torch.compile(model) + eager AdamW.step()",
    "torch_compiled_adamw_nodropout": "the same as torch_compiled_adamw, dropout 0.0",
    "fxtrain_eager": "fxtrain step, dropout 0.1, not compiled (for the break-even)",
    "fxtrain_precompiled": "fxtrain step, dropout 0.1, through fx.precompiled (a file in the "
                           "cache folder: cold compiles and saves it, warm loads it)",
}
# For the breakdown, not run by default: the optimizer's share of fxtrain's step.
EXTRA = {"fxtrain_regional": "fxtrain step over fx.regional(state): each block traced and "
                             "compiled once (issue 62), dropout 0.1",
         "fxtrain_regional_nodropout": "fxtrain_regional with dropout 0.0 (the keyed "
                                       "stream's share of a block's call)",
         "fxtrain_regional_outerupdate": "fxtrain_regional with its blocks' update in the outer "
                                         "graph (no update region: _region_update.built off)",
         "torch_regional_nodropout": "torch_regional with dropout 0.0 (against "
                                     "fxtrain_regional_nodropout: the gap without the masks)",
         "fxtrain_sgd_nodropout": "fxtrain step with fx.optim.sgd (no state), dropout 0.0",
         "fxtrain_autograd": "fxtrain step, autodiff='autograd', dropout 0.1",
         "fxtrain_norecompute": "fxtrain step without fxtrain._torch.recompute's pass, dropout 0.1",
         "fxtrain_nolibraries_precompiled": "fxtrain_precompiled without the C++ libraries in "
                                            "its file (before issue 62: a warm process builds "
                                            "them again)"}
SMOKE = ["fxtrain", "torch_compiled_adamw", "fxtrain_eager", "fxtrain_precompiled"]
# the break-even on the small MLP too (--kinds): the compiled step against the eager one
MLP_VARIANTS = ["fxtrain", "fxtrain_eager"]
STEADY_S = 1.0  # seconds of steady steps timed after the first (3 to 200 steps)
# phases of torch._dynamo.utils.compile_times worth a column (seconds summed over graphs)
PHASES = ("_compile.compile_inner", "bytecode_tracing", "OutputGraph.call_user_compiler",
          "create_aot_dispatcher_function", "compile_fx_inner", "GraphLowering.run",
          "Scheduler.__init__", "Scheduler.codegen", "PythonWrapperCodegen.generate",
          "async_compile.wait", "compile_file", "PyCodeCache.load_by_key_path")


# ---------------------------------------------------------------- the child process's side


def gpt2(dropout: float):
    """The GPT-2 every GPT-2 variant trains (seeded), and a batch of token ids."""
    import torch
    import transformers

    torch.manual_seed(0)
    layers = int(os.environ.get("FXTRAIN_BENCH_LAYERS", GPT2["n_layer"]))
    config = transformers.GPT2Config(**{**GPT2, "n_layer": layers}, resid_pdrop=dropout,
                                     embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                                     bos_token_id=0,
                                     eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # otherwise transformers guesses it on each call, and warns
    batch = torch.randint(0, GPT2["vocab_size"], (BATCH, TOKENS),
                          generator=torch.Generator().manual_seed(0))
    return model, batch


def gpt2_loss(state, params, batch):
    """fxtrain's loss function for GPT-2: transformers' own causal-LM loss."""
    return state.apply(params, input_ids=batch, labels=batch).loss


def mlp_loss(state, params, batch):
    import torch.nn.functional as F

    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


class _Module:
    """Stands in for fxtrain's state in the loss functions above: ``apply`` runs ``forward``."""

    def __init__(self, forward):
        self.forward = forward

    def apply(self, params, *args, **kwargs):
        del params
        return self.forward(*args, **kwargs)


def mlp(dropout: float):
    """The smoke model: 32-64-10 with dropout between, and a batch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    return model, (torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g))


def fxtrain_step(model, loss, optimizer: str, autodiff: str = "func", how: str = "compiled",
                 regional: bool = False):
    """``how``: "compiled" (torch.compile), "eager" or "precompiled" (fx.precompiled, its file in
    the Inductor cache folder: the first call loads it, or compiles and saves it)."""
    import torch

    import fxtrain as fx

    tx = fx.optim.sgd(LR) if optimizer == "sgd" else fx.optim.adamw(LR, weight_decay=WD)
    state = fx.TrainState.create(model, tx)
    if regional:
        state = fx.regional(state)
    step = fx.make_train_step(loss, autodiff="auto" if regional else autodiff)
    if how == "precompiled":  # warm: the cold process's file, with an Inductor cache of its own
        path = os.environ.get("FXTRAIN_BENCH_STEP_FILE") or \
            Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "step.bin"
        step = fx.precompiled(step, path)
    elif how == "compiled":
        step = torch.compile(step, fullgraph=True)
    holder = [state]

    def run(batch):
        holder[0], metrics = step(holder[0], batch)
        return metrics["loss"]

    return run


def torch_step(model, loss, compiled_optimizer: bool, regional: bool = False):
    """torch.compile(model), or with ``regional`` torch's regional recipe (each repeated block
    compiled, as torchtitan's ``apply_compile`` does: one block traced and compiled, its code
    reused by the others; the rest of the model eager); ``torch.optim.AdamW``, its ``step()``
    compiled where asked (the compiled-optimizer tutorial's recipe)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    if regional:  # as torchtitan's apply_compile writes it, for GPT-2's blocks
        for block in model.transformer.h:
            block.compile()
        forward = _Module(model)
    else:
        forward = _Module(torch.compile(model))
    opt_step = torch.compile(opt.step) if compiled_optimizer else opt.step

    def run(batch):
        opt.zero_grad(set_to_none=True)
        out = loss(forward, None, batch)
        out.backward()
        opt_step()
        return out.detach()

    return run


def build(variant: str, kind: str):
    dropout = 0.0 if variant.endswith("nodropout") else 0.1
    model, batch = (gpt2 if kind == "gpt2" else mlp)(dropout)
    model.train()
    loss = gpt2_loss if kind == "gpt2" else mlp_loss
    if variant.startswith("fxtrain"):
        if variant.endswith("_norecompute"):
            import fxtrain._torch.recompute
            fxtrain._torch.recompute.recompute = lambda graph: None
        if variant.endswith("_outerupdate"):
            import fxtrain.step._region_update
            fxtrain.step._region_update.built = lambda state: None
        if "_nolibraries" in variant:
            import fxtrain._torch.binaries
            fxtrain._torch.binaries.made_since = lambda since: {}
        how = next((h for h in ("eager", "precompiled") if variant.endswith("_" + h)),
                   "compiled")
        return fxtrain_step(model, loss, "sgd" if "_sgd" in variant else "adamw",
                            "autograd" if "_autograd" in variant else "func", how,
                            regional="_regional" in variant), batch
    regional = variant.startswith("torch_regional")
    return torch_step(model, loss, compiled_optimizer="compiled" in variant or regional,
                      regional=regional), batch


def cache_files(cache: Path) -> dict[str, int]:
    """How many C++ sources, shared objects and Python modules Inductor left in ``cache``."""
    files = [p for p in cache.rglob("*") if p.is_file()]
    return {"cpp": sum(p.suffix == ".cpp" for p in files),
            "so": sum(p.suffix == ".so" for p in files),
            "py": sum(p.suffix == ".py" for p in files), "files": len(files)}


def process_tree_cpu() -> float:
    """CPU seconds used so far by this process, its threads and its children (Inductor's
    compile workers and the compilers they ran): less sensitive than wall time to other jobs
    on a shared machine. 0.0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, and those of children already reaped
    for child_process in me.children(recursive=True):
        try:
            total += sum(child_process.cpu_times()[:4])
        except psutil.NoSuchProcess:
            pass
    return total


def child(variant: str, kind: str, cache: str, spawned: float, out: str) -> None:
    """One measurement in this fresh process: imports, build, first step, a few more steps."""
    start = time.time()
    import torch
    import torch._dynamo.utils as dynamo_utils
    import torch._inductor.metrics as inductor_metrics

    if kind == "gpt2":
        import transformers  # noqa: F401 - its import is part of what a user pays
    import fxtrain  # noqa: F401
    imported = time.time()
    torch.set_num_threads(1)
    step, batch = build(variant, kind)
    cpu, before = process_tree_cpu(), time.time()
    loss = step(batch)
    first, cpu = time.time(), process_tree_cpu() - cpu
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    times, steady = [], time.perf_counter()
    while len(times) < 3 or (len(times) < 200 and time.perf_counter() - steady < STEADY_S):
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
    phases = {k: sum(v) for k, v in dynamo_utils.compilation_time_metrics.items()}
    record = {
        "variant": variant, "loss": float(loss),
        "startup_s": start - spawned, "import_s": imported - start, "build_s": before - imported,
        "first_step_s": first - before, "first_step_cpu_s": cpu, "ready_s": first - spawned,
        "step_s": statistics.median(times), "steps_timed": len(times),
        "load": os.getloadavg()[0],
        "graphs": graphs, "recompiled": dynamo_utils.counters["stats"]["unique_graphs"] != graphs,
        "phases": phases,
        "generated_kernels": inductor_metrics.generated_kernel_count,
        "counters": {group: dict(dynamo_utils.counters[group])
                     for group in ("inductor", "aot_autograd", "graph_break")},
        "cache_files": cache_files(Path(cache)),
    }
    Path(out).write_text(json.dumps(record))


# ---------------------------------------------------------------- the parent's side


def spawn(variant: str, kind: str, cache: Path, env_extra: dict | None = None) -> dict:
    """``child`` in a fresh interpreter with ``cache`` as Inductor's cache; its record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), **(env_extra or {})}
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", variant, kind,
                str(cache), repr(time.time()), str(out)]
        done = subprocess.run(argv, env=env, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            return {"variant": variant, "failed": f"exit code {done.returncode}"}
        return json.loads(out.read_text())


def measure(variants, kind: str, rounds: int, warm: set[str]) -> dict:
    """``{variant: {"cold": [records], "warm": [records]}}``, order rotated every round."""
    results = {v: {"cold": [], "warm": []} for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            with tempfile.TemporaryDirectory(prefix="fxtrain-compile-") as cache:
                for mode in ("cold", "warm") if variant in warm else ("cold",):
                    if mode == "warm" and variant.endswith("_precompiled"):
                        # only the file: what another machine or a cleared cache starts from
                        with tempfile.TemporaryDirectory(prefix="fxtrain-compile-") as fresh:
                            record = spawn(variant, kind, Path(fresh), {
                                "FXTRAIN_BENCH_STEP_FILE": str(Path(cache) / "step.bin")})
                    else:
                        record = spawn(variant, kind, Path(cache))
                    results[variant][mode].append(record)
                    print(f"  round {r + 1} {variant:32s} {mode}: " + (
                        record.get("failed") or f"first step {record['first_step_s']:.1f} s "
                        f"(ready {record['ready_s']:.1f} s, import {record['import_s']:.1f} s)"),
                        flush=True)
    return results


def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if "failed" not in r]
    return statistics.median(values) if values else None


def summary(results: dict, baseline: str = BASELINE) -> dict:
    """Medians per variant and mode, and the first-step and steady-step ratios against
    ``baseline`` in the same mode (cold or warm)."""
    out = {}
    for variant, modes in results.items():
        out[variant] = {}
        for mode, records in modes.items():
            if not records:
                continue
            ok = [r for r in records if "failed" not in r]
            row = {k: median_of(records, k) for k in
                   ("first_step_s", "first_step_cpu_s", "ready_s", "import_s", "step_s", "graphs",
                    "generated_kernels")}
            if ok:
                row["phases"] = {p: statistics.median(r["phases"].get(p, 0.0) for r in ok)
                                 for p in sorted({p for r in ok for p in r["phases"]})}
                row["cache_files"] = ok[0]["cache_files"]
                row["recompiled"] = any(r["recompiled"] for r in ok)
            out[variant][mode] = row
    for variant, modes in out.items():
        if modes.get("cold") and modes.get("warm"):
            modes["warm"].update(warm_cold(modes["cold"], modes["warm"]))
        for mode, row in modes.items():
            base = out.get(baseline, {}).get(mode, {})
            for key, ratio in (("first_step_s", "vs_baseline"),
                               ("first_step_cpu_s", "cpu_vs_baseline"),
                               ("step_s", "step_vs_baseline")):
                if base.get(key) and row.get(key) is not None:
                    row[ratio] = row[key] / base[key]
    return out


def break_even(summ: dict) -> dict:
    """Where compiling pays, cold and warm: the length of a run (in steps, its first one
    included) from which the compiled fxtrain step has taken less time than the same step
    uncompiled; ``steps`` None where the compiled step is not faster, so compiling never pays.

    A run of n steps takes first + (n - 1) * step either way, so the two meet at
    n = 1 + (compiled first - eager first) / (eager step - compiled step)."""
    eager = summ.get("fxtrain_eager", {}).get("cold", {})
    out = {}
    for mode in ("cold", "warm"):
        compiled = summ.get("fxtrain", {}).get(mode, {})
        if None in (eager.get("step_s"), compiled.get("step_s"), eager.get("first_step_s"),
                    compiled.get("first_step_s")):
            continue
        saved = eager["step_s"] - compiled["step_s"]
        cost = compiled["first_step_s"] - eager["first_step_s"]
        steps = 1 + max(0, math.ceil(cost / saved)) if saved > 0 else None
        out[mode] = {"steps": steps, "compiled_first_s": compiled["first_step_s"],
                     "eager_first_s": eager["first_step_s"],
                     "compiled_step_s": compiled["step_s"], "eager_step_s": eager["step_s"],
                     "eager_run_s": None if steps is None else
                     eager["first_step_s"] + (steps - 1) * eager["step_s"]}
    return out


def break_even_table(found: dict) -> str:
    """``{kind: break_even(...)}`` as text."""
    lines = [f"{'model':6s} {'mode':5s} {'compiled 1st':>12s} {'eager 1st':>9s} "
             f"{'compiled step':>13s} {'eager step':>10s} {'pays after':>12s}"]
    for kind, modes in found.items():
        for mode, row in modes.items():
            pays = "never" if row["steps"] is None else \
                f"{row['steps']} steps ({row['eager_run_s']:.0f} s eager)"
            lines.append(f"{kind:6s} {mode:5s} {row['compiled_first_s']:11.1f}s "
                         f"{row['eager_first_s']:8.2f}s {row['compiled_step_s'] * 1e3:10.2f} ms "
                         f"{row['eager_step_s'] * 1e3:7.2f} ms {pays}")
    return "\n".join(lines)


def warm_cold(row_cold: dict, row_warm: dict) -> dict:
    """A variant's warm first step against its cold one, in wall and in CPU seconds."""
    out = {}
    for key, ratio in (("first_step_s", "warm_vs_cold"), ("first_step_cpu_s", "cpu_warm_vs_cold")):
        if row_cold.get(key) and row_warm.get(key) is not None:
            out[ratio] = row_warm[key] / row_cold[key]
    return out


def warm_cold_table(summaries: dict) -> str:
    """``{kind: summary(...)}``: a row per kind and variant measured cold and warm."""
    lines = [f"{'model':6s} {'variant':31s} {'cold 1st':>8s} {'warm 1st':>8s} {'warm/cold':>9s} "
             f"{'cold CPU':>8s} {'warm CPU':>8s} {'warm/cold':>9s}"]
    for kind, summ in summaries.items():
        for variant, modes in summ.items():
            cold, warm = modes.get("cold", {}), modes.get("warm", {})
            if cold.get("first_step_s") is None or warm.get("first_step_s") is None:
                continue
            ratios = warm_cold(cold, warm)
            lines.append(
                f"{kind:6s} {variant:31s} {cold['first_step_s']:7.1f}s "
                f"{warm['first_step_s']:7.1f}s "
                f"{ratios.get('warm_vs_cold', float('nan')):8.2f}x "
                f"{cold['first_step_cpu_s']:7.1f}s {warm['first_step_cpu_s']:7.1f}s "
                f"{ratios.get('cpu_warm_vs_cold', float('nan')):8.2f}x")
    return "\n".join(lines)


def table(summ: dict) -> str:
    """The summary as text: one row per variant and mode."""
    lines = [f"{'variant':31s} {'mode':5s} {'1st step':>8s} {'vs base':>7s} {'CPU':>7s} "
             f"{'vs base':>7s} {'ready':>6s} {'import':>6s} {'graphs':>6s} {'kernels':>7s} "
             f"{'.cpp':>4s} {'step ms':>7s}"]
    for variant, modes in summ.items():
        for mode, row in modes.items():
            if row.get("first_step_s") is None:
                lines.append(f"{variant:31s} {mode:5s} failed")
                continue
            lines.append(
                f"{variant:31s} {mode:5s} {row['first_step_s']:7.1f}s "
                f"{row.get('vs_baseline', float('nan')):6.2f}x {row['first_step_cpu_s']:6.1f}s "
                f"{row.get('cpu_vs_baseline', float('nan')):6.2f}x {row['ready_s']:5.1f}s "
                f"{row['import_s']:5.1f}s {row['graphs']:6.0f} {row['generated_kernels']:7.0f} "
                f"{row.get('cache_files', {}).get('cpp', 0):4d} {row['step_s'] * 1e3:7.1f}")
    lines.append("\nphases, cold (s, summed over graphs; torch._dynamo.utils.compile_times):")
    for variant, modes in summ.items():
        phases = modes.get("cold", {}).get("phases", {})
        lines.append(f"  {variant}: " + ", ".join(
            f"{p} {phases[p]:.1f}" for p in PHASES if p in phases))
    return "\n".join(lines)


def by_depth(args: argparse.Namespace) -> dict:
    """``--layers``: the GPT-2 variants at each depth (cold, and warm where asked), then one
    table of first steps by depth with each variant's ratio to the baseline at that depth and
    to its own first step at the smallest depth (flat in depth: near 1)."""
    found = {}
    for layers in args.layers:
        os.environ["FXTRAIN_BENCH_LAYERS"] = str(layers)
        print(f"compile time, gpt2 of {layers} layers, {args.rounds} round(s), load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        found[layers] = summary(measure(args.variants, "gpt2", args.rounds, set(args.warm)),
                                args.baseline)
        print(table(found[layers]), flush=True)
    print("\n" + depth_table(found, args.variants))
    record = {"model": "gpt2", "gpt2": GPT2, "layers": args.layers, "rounds": args.rounds,
              "by_depth": {str(k): v for k, v in found.items()}}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def depth_table(found: dict, variants: list[str]) -> str:
    """First steps (cold) by depth, in CPU seconds of the process and its compile workers
    (steadier than wall time on a shared machine): seconds, x the baseline at that depth, x
    its own at the smallest depth; and the steady step's time x the baseline's."""
    smallest = min(found)
    lines = [f"{'layers':>6s} " + " ".join(f"{v:>52s}" for v in variants)]
    for layers, summ in sorted(found.items()):
        cells = []
        for v in variants:
            row = summ.get(v, {}).get("cold", {})
            first = row.get("first_step_cpu_s")
            base = found[smallest].get(v, {}).get("cold", {}).get("first_step_cpu_s")
            nan = float("nan")
            cells.append("failed" if first is None else
                         f"{first:6.1f} CPU-s {row.get('cpu_vs_baseline', nan):5.2f}x base "
                         f"{first / base if base else nan:5.2f}x {smallest}L steady "
                         f"{row.get('step_vs_baseline', nan):5.2f}x")
        lines.append(f"{layers:6d} " + " ".join(f"{c:>52s}" for c in cells))
    return "\n".join(lines)


def arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=[*VARIANTS, *EXTRA])
    parser.add_argument("--warm", nargs="*", default=["fxtrain", "fxtrain_precompiled", BASELINE],
                        choices=[*VARIANTS, *EXTRA],
                        help="variants measured a second time on their warm cache")
    parser.add_argument("--baseline", default=BASELINE, choices=[*VARIANTS, *EXTRA],
                        help="the variant the ratios are against (torch_regional: torch's "
                        "regional recipe, the fair anchor for fx.regional)")
    parser.add_argument("--out", type=Path, help="write the records and the summary as JSON")
    parser.add_argument("--kinds", nargs="+", default=["gpt2", "mlp"], choices=["gpt2", "mlp"],
                        help="models: the first with --variants, the others with fxtrain "
                        "compiled and eager only (the break-even of compiling; see --each-kind)")
    parser.add_argument("--each-kind", action="store_true",
                        help="every kind of --kinds with --variants and --warm, not only the "
                        "first (a warm/cold table of fx.precompiled for GPT-2 and the MLP)")
    parser.add_argument("--layers", nargs="+", type=int,
                        help="GPT-2 depths, each measured in turn (the variants side by side in "
                        "one run), and a table of first steps by depth; default: the one model")
    parser.add_argument("--smoke", action="store_true",
                        help="the small MLP instead of GPT-2; fxtrain (cold and warm, and "
                        "eager) and the baseline only, one round")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Measures the variants; returns ``{"model", "summary", "records"}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], argv[3], float(argv[4]), argv[5])
    args = arguments(argv)
    if args.smoke:
        args.rounds, args.variants, args.kinds = 1, SMOKE, ["mlp"]
        args.warm = ["fxtrain", "fxtrain_precompiled"]
    if args.layers:
        return by_depth(args)
    kind, record = args.kinds[0], {}
    for other in args.kinds:
        variants, warm = (args.variants, set(args.warm)) if other == kind or args.each_kind \
            else (MLP_VARIANTS, {"fxtrain"})
        print(f"compile time, {other}, {args.rounds} round(s), {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        results = measure(variants, other, args.rounds, warm)
        record[other] = {"summary": summary(results, args.baseline), "records": results}
        print(table(record[other]["summary"]))
    if any(modes.get("warm") for k in args.kinds for modes in record[k]["summary"].values()):
        print("\nwarm against cold, each variant's first step (fresh processes, CPU of the "
              "process and its compile workers):\n" + warm_cold_table(
                  {k: record[k]["summary"] for k in args.kinds}))
    found = {k: break_even(record[k]["summary"]) for k in args.kinds}
    print("\nthe break-even of compiling fxtrain's step (a run of at least that many steps is "
          "faster compiled):\n" + break_even_table(found))
    main_kind = record.pop(kind)
    record = {"model": kind, "gpt2": GPT2 if kind == "gpt2" else None, "rounds": args.rounds,
              "summary": main_kind["summary"], "records": main_kind["records"],
              "break_even": found, "other_models": record}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
