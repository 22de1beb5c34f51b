"""The GPU kit's rows as figures and text (``gpu_transformer.py``): MFU and the ratios to the fair
baselines, the targets met or not, the chunked losses against the whole logits, the fp8 rows
against their variant's at the run's precision, the demo's figures read from what it printed,
and the markdown section a stage writes (``OUT/<stage>.md``, appended to
benchmarks/gpu/RESULTS.md).

The fair baselines are ``BASELINES``: the loss inside the compiled module (``loop``) and the
whole step under one ``torch.compile`` (``loop_step``). Every row gets its ratios to each, and
a target is judged against the stronger for its figure: tokens/s against the faster, memory
against the leaner. ``loop_eager_loss`` (the loss outside the compiled module, on a float32
copy of the logits) is a row of its own, never a baseline.
"""

from __future__ import annotations

import json
import math
import re

BASELINES = ("loop", "loop_step")
LABELS = {
    "loop": "loop: `torch.compile` of the model with its loss inside, fused AdamW",
    "loop_step": "loop_step: forward, backward and AdamW under one `torch.compile`",
    "loop_eager_loss": "loop_eager_loss (extra, not a baseline): loss outside the compiled "
                       "model, on a float32 copy of the logits",
    "loop_regional": "loop_regional: torch's regional recipe (each block compiled), loss in "
                     "the model, fused AdamW",
    "fx_func": "`fx.fit`, `torch.func` step",
    "fx_regional": "`fx.fit` over `fx.regional(state)`: each block compiled once",
    "fx_shard": "`fx.fit` over `fx.shard(state, units=\"auto\")`, one rank, eager",
    "fx_autograd": "`fx.fit`, autograd step",
    "fx_graphed": "`fx.fit`, `fx.cuda_graphed` step",
    "fx_k": "`fx.fit`, K steps per call",
    "fx_remat": "`fx.fit` + `fx.remat` per block (autograd)",
    "fx_chunked": "`fx.fit`, chunked loss (fxtrain's kernel)",
    "fx_liger": "`fx.fit`, chunked loss (Liger's kernel)",
    "fx_remat_chunked": "`fx.fit` + `fx.remat` per block, chunked loss",
    "hf_trainer": "transformers `Trainer`, `torch_compile=True`",
}
# issue 58: a chunked loss against the step with the whole logits, same run
CHUNKED_TOKENS, CHUNKED_MEMORY = 0.95, 0.5


def ratios(rows: dict, peak_tf: float | None) -> None:
    """Adds MFU, bytes per parameter and the ratios to each fair baseline, and to the stronger
    (``*_vs_best``: the faster for tokens/s, the leaner for memory), to each good row; to a row
    ``<variant>:<precision>`` (``--fp8-variants``), its ratios to ``<variant>``'s
    (``*_vs_base_precision``)."""
    fair = {b: rows[b] for b in BASELINES if "tokens_per_s" in rows.get(b, {})}
    fastest = max(fair, key=lambda b: fair[b]["tokens_per_s"], default=None)
    leanest = min(fair, key=lambda b: fair[b]["peak_bytes"], default=None)
    for row in rows.values():
        if "tokens_per_s" not in row:
            continue
        row["bytes_per_param"] = row["peak_bytes"] / row["params"]
        row["mfu"] = (row["tokens_per_s"] * row["flops_per_token"] / (peak_tf * 1e12)
                      if peak_tf else None)
        for name, base in fair.items():
            row[f"tokens_vs_{name}"] = row["tokens_per_s"] / base["tokens_per_s"]
            row[f"memory_vs_{name}"] = row["peak_bytes"] / base["peak_bytes"]
        if fair:
            row["tokens_vs_best"] = row[f"tokens_vs_{fastest}"]
            row["memory_vs_best"] = row[f"memory_vs_{leanest}"]
            row["fastest_baseline"], row["leanest_baseline"] = fastest, leanest
    for name, row in rows.items():  # <variant>:<precision> against <variant>
        base = rows.get(name.partition(":")[0], {})
        if ":" in name and "tokens_per_s" in row and "tokens_per_s" in base:
            row["tokens_vs_base_precision"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["memory_vs_base_precision"] = row["peak_bytes"] / base["peak_bytes"]


def targets(record: dict) -> list[str]:
    """Issue 48's targets against the fair baselines, each met or not (those the run has)."""
    lines = []
    for dropout, rows in record["dropouts"].items():
        fx = rows.get("fx_func", {})
        if "tokens_vs_best" in fx:
            lines.append(_verdict(f"dropout {dropout}: fx.fit tokens/s", fx, "tokens",
                                  1.0 if float(dropout) == 0 else 0.9))
            lines.append(_verdict(f"dropout {dropout}: fx.fit peak memory", fx, "memory", 1.0))
        for variant, what in (("fx_remat", "fx.remat per block"),
                              ("fx_remat_chunked", "fx.remat per block + chunked loss")):
            if "memory_vs_best" in rows.get(variant, {}):
                lines.append(_verdict(f"dropout {dropout}: {what} peak memory", rows[variant],
                                      "memory", 0.5))
        fx = rows.get("fx_func", rows.get("fx_chunked", {}))  # fx.fit, either loss
        if float(dropout) == 0 and "attention" in fx:
            kept = fx["attention"] not in ("none", "not profiled")
            lines.append(f"dropout 0: fx.fit's attention kernel: {fx['attention']} (target: "
                         f"flash or efficient kept): {'met' if kept else 'NOT met'}")
    return lines


def _verdict(what: str, row: dict, figure: str, bound: float) -> str:
    at_least = figure == "tokens"
    base = row["fastest_baseline" if at_least else "leanest_baseline"]
    value = row[f"{figure}_vs_best"]
    met = value >= bound if at_least else value <= bound
    return (f"{what} {value:.2f}x {base}, the {'faster' if at_least else 'leaner'} fair loop "
            f"(target {'>=' if at_least else '<='} {bound}x): {'met' if met else 'NOT met'}")


def against_full_logits(record: dict, chunked: dict[str, tuple[str, ...]]) -> list[str]:
    """Each chunked variant's tokens/s and peak memory over those of its variant with the whole
    logits (``chunked``: chunked -> the whole-logits variants to compare with, the first of
    them the run has), with issue 58's targets (>= 0.95x the tokens/s at <= 0.5x the peak);
    where the run has none of them, where to look."""
    lines = []
    for dropout, rows in record["dropouts"].items():
        for variant, fulls in chunked.items():
            a = rows.get(variant, {})
            full = next((f for f in fulls if "tokens_per_s" in rows.get(f, {})), None)
            if "tokens_per_s" not in a:
                continue
            if full is None:
                lines.append(f"dropout {dropout}: {' or '.join(fulls)} not in this run: "
                             f"compare {variant}'s ratios to the loops with theirs from another "
                             f"run")
                continue
            b = rows[full]
            tokens = a["tokens_per_s"] / b["tokens_per_s"]
            memory = a["peak_bytes"] / b["peak_bytes"]
            met = tokens >= CHUNKED_TOKENS and memory <= CHUNKED_MEMORY
            batches = "" if a["batch"] == b["batch"] else \
                f" (batch {a['batch']} against {b['batch']})"
            lines.append(f"dropout {dropout}: {variant} against {full} (the whole logits)"
                         f"{batches}: tokens/s {tokens:.2f}x, peak memory {memory:.2f}x "
                         f"(target >= {CHUNKED_TOKENS}x at <= {CHUNKED_MEMORY}x): "
                         f"{'met' if met else 'NOT met'}")
    return lines


# issue 77: fx.regional against torch's regional recipe, the same run
ANCHORS = {"fx_regional": "loop_regional"}
REGIONAL_FIRST_STEP, REGIONAL_TOKENS = 1.0, 1.0


def against_anchor(record: dict) -> list[str]:
    """Each of fxtrain's rows that has an anchor of its own (``ANCHORS``: fx_regional against
    torch's regional recipe) against it, the same run and batch: the first step's seconds
    (compiling; target at most ``REGIONAL_FIRST_STEP`` x the anchor's) and tokens/s (the
    steady step; target at least ``REGIONAL_TOKENS`` x), or why there is no figure; nothing
    where the stage ran only one of the two."""
    lines = []
    for dropout, rows in record["dropouts"].items():
        for name, anchor in ANCHORS.items():
            if name not in rows or anchor not in rows:  # not both in this stage
                continue
            row, base = rows[name], rows[anchor]
            head = f"dropout {dropout}: {name} against {anchor} (the same run)"
            if "tokens_per_s" not in row or "tokens_per_s" not in base:
                lines.append(f"{head}: not measured: "
                             + summary(row if "tokens_per_s" not in row else base))
                continue
            first = row["first_step_s"] / base["first_step_s"]
            tokens = row["tokens_per_s"] / base["tokens_per_s"]
            lines.append(
                f"{head}: first step {row['first_step_s']:.1f} s against "
                f"{base['first_step_s']:.1f} s, {first:.2f}x (target <= "
                f"{REGIONAL_FIRST_STEP:.1f}x: {'met' if first <= REGIONAL_FIRST_STEP else 'NOT met'}"
                f"); tokens/s {tokens:.2f}x (target >= {REGIONAL_TOKENS:.1f}x: "
                f"{'met' if tokens >= REGIONAL_TOKENS else 'NOT met'})")
    return lines


def against_precision(record: dict) -> list[str]:
    """Each ``<variant>:<precision>`` row (``--fp8-variants``) against ``<variant>``'s at the
    run's precision, the same run and batch: its tokens/s and peak memory as ratios, or why
    there is no figure (torchao not installed, an error)."""
    lines = []
    for dropout, rows in record["dropouts"].items():
        for name, row in rows.items():
            variant, _, precision = name.partition(":")
            if not precision:
                continue
            head = f"dropout {dropout}: {variant} in {precision} against {record['precision']}"
            base = rows.get(variant)
            if "tokens_vs_base_precision" in row:
                batches = "" if row["batch"] == base["batch"] else \
                    f", batch {row['batch']} against {base['batch']}"
                lines.append(f"{head} (the same run{batches}): tokens/s "
                             f"{row['tokens_vs_base_precision']:.2f}x, peak memory "
                             f"{row['memory_vs_base_precision']:.2f}x")
            elif "tokens_per_s" not in row:
                lines.append(f"{head}: not measured: {summary(row)}")
            else:
                lines.append(f"{head}: no ratio: {variant} in {record['precision']} "
                             f"{summary(base) if base else 'did not run'}")
    return lines


def summary(row: dict) -> str:
    if row.get("skipped"):
        return row["skipped"]
    if "error" in row or "oom" in row:
        return row.get("error", f"out of memory at batch {row.get('oom')}").splitlines()[-1]
    return (f"{row['tokens_per_s']:.0f} tokens/s, batch {row['batch']}, first step "
            f"{row['first_step_s']:.1f} s, peak {row['peak_bytes'] / 2**30:.2f} GiB, "
            f"attention {row['attention']}")


def _x(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else f"{value:.2f}x"


def markdown(record: dict) -> str:
    """The rows as a table for benchmarks/gpu/RESULTS.md."""
    fair = " | ".join(f"vs {b}" for b in BASELINES)
    out = [f"| dropout | variant | batch | tokens/s | {fair} | MFU | peak GiB | bytes/param | "
           f"{fair} | attention | first step s |", "|---" * 13 + "|"]
    for dropout, rows in record["dropouts"].items():
        for variant, row in rows.items():
            if "tokens_per_s" not in row:
                out.append(f"| {dropout} | {variant} | | {summary(row)} |" + " |" * 9)
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
            speed = " | ".join(_x(row, f"tokens_vs_{b}") for b in BASELINES)
            memory = " | ".join(_x(row, f"memory_vs_{b}") for b in BASELINES)
            kernel = f" ({row['loss_kernel']})" if row.get("loss_kernel") else ""
            out.append(
                f"| {dropout} | {variant}{kernel} | {row['batch']} | "
                f"{row['tokens_per_s']:,.0f} | {speed} | {mfu} | "
                f"{row['peak_bytes'] / 2**30:.2f} | {row['bytes_per_param']:.1f} | {memory} | "
                f"{row['attention']} | {row['first_step_s']:.1f} |")
    return "\n".join(out)


def section(record: dict, title: str, command: str, commit: str, date: str) -> str:
    """A stage's section for benchmarks/gpu/RESULTS.md: when, where, what, the table, the
    targets."""
    where, versions = _where(record["environment"])
    probe = record.get("probe")
    sizing = (f" (the probe, the loop's compiled steps at batch 2 and 4: "
              f"{probe['per_sequence'] / 2**20:.0f} MiB a sequence, "
              f"{probe['fixed'] / 2**30:.2f} GiB fixed, 80% of "
              f"{probe['total'] / 2**30:.1f} GiB)" if probe else "")
    big = (f"; {', '.join(record['big_variants'])} at batch {record['big_batch']}, "
           f"{record.get('big_why', '')}" if record.get("big_variants") else "")
    peak = (f"MFU over {record['peak_tflops']} TFLOP/s (dense bf16)" if record.get("peak_tflops")
            else "MFU not computed (no peak known for this device)")
    fp8 = (f"; {', '.join(record['fp8_variants'])} in fp8 too (`fx.precision.float8()`, "
           f"torchao's recipe for the loops), at the same batch" if record.get("fp8_variants")
           else "")
    lines = [f"#### {title}: {date}", "",
             f"{where}; {versions}; fxtrain {commit}; command: `{command}`", "",
             f"`--model {record['model']}`, sequence {record['seq']}, {record['precision']}{fp8}, "
             f"AdamW (lr {record['lr']}, weight decay {record['weight_decay']} on every "
             f"parameter); batch {record['batch']}{sizing}{big}; {record['steps']} timed steps "
             f"after {record['warmup']}; {peak}, "
             f"{_flops(record)} a token. Each variant in its own process; ratios to the fair "
             f"loops of the same run.", "", markdown(record), ""]
    lines += [f"- {line}" for line in record.get("targets", []) +
              record.get("against_full_logits", []) + record.get("against_precision", []) +
              record.get("against_anchor", [])]
    return "\n".join(lines) + "\n"


def _where(env: dict) -> tuple[str, str]:
    """The device (with its memory, capability and driver on a GPU) and the versions."""
    where = (f"{env['device']} ({env['memory_gib']:.1f} GiB, capability {env['capability']}), "
             f"driver {env.get('driver', '?')}" if "memory_gib" in env else env["device"])
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "python", "transformers",
                                                    "liger_kernel", "torchao") if env.get(k))
    return where, versions


def _flops(record: dict) -> str:
    rows = [r for rows in record["dropouts"].values() for r in rows.values()
            if "flops_per_token" in r]
    return f"{rows[0]['flops_per_token'] / 1e6:,.1f} MFLOP" if rows else "n/a MFLOP"


# -- the demo (``gpu_transformer.py --demo``) --------------------------------------------------


def demo_figures(text: str, metrics_jsonl: str) -> dict:
    """What ``fxtrain demo`` printed of its run, and its hparams in metrics.jsonl: the held-out
    metrics it ended with (``held_out``: loss, bits_per_char, accuracy) and their ``step``, its
    steps/s after the first (compiling) step, the ``device`` (fit's summary), who stopped it
    (``stopped_by``: fit's line, or a Ctrl-C), whether it ended ``finite`` (a finite held-out
    loss and no ``nan_guard`` stop; None without a held-out figure), its ``precision`` and
    ``steps``."""
    row: dict = {"device": "unknown", "stopped_by": None}
    if found := re.search(r"^final held-out metrics \(step (\d+)[^)]*\): (.+)$", text, re.M):
        row["step"] = int(found.group(1))
        row["held_out"] = {k: float(v) for k, v in re.findall(r"(\w+) (\S+)", found.group(2))}
    if found := re.search(r"(\d+) steps in ([\d.]+) s after the first", text):
        row["steps_per_s"] = int(found.group(1)) / max(float(found.group(2)), 1e-9)
    if found := re.search(r"\bdevice\s*[│|]\s*([^\s│|]+)", text):
        row["device"] = found.group(1)
    if found := re.search(r"^(?:fxtrain: stopped at step \d+ by (.+)|(interrupted at step \d+))",
                          text, re.M):
        row["stopped_by"] = found.group(1) or f"Ctrl-C ({found.group(2)})"
    hparams = next((r["values"] for r in map(json.loads, metrics_jsonl.splitlines())
                    if r.get("kind") == "hparams"), {})
    row["precision"], row["steps"] = hparams.get("precision"), hparams.get("steps")
    guard = re.search(r"^fxtrain(?: demo)?: stopped at step \d+.*\bnan_guard\b", text, re.M)
    loss = row.get("held_out", {}).get("loss")
    row["finite"] = None if loss is None else math.isfinite(loss) and not guard
    return row


def demo_target(docs: str, model: str) -> dict | None:
    """docs/demo.md's reference run of ``--model model`` (its row of the table): its steps, bits
    per character and what the docs say of the run. The docs state no target of the
    transformer's own (on any device): its reference run's figure stands for one."""
    found = re.search(rf"^\| `--model {model}`([^|]*)\| (\d+) \| ([\d.]+) bits per character",
                      docs, re.M)
    if not found:
        return None
    return {"steps": int(found.group(2)), "bits_per_char": float(found.group(3)),
            "source": f"docs/demo.md's reference run: {found.group(1).strip().strip('()')}"}


def demo_verdict(row: dict, target: dict | None) -> str:
    """The demo's target met or not: held-out bits per character at most the docs' figure (the
    run's rounded to the docs' two decimals), finite, at the steps the docs ran; not judged
    after other steps (as the demo judges its own target only at its default steps)."""
    if target is None:
        return "target: no reference run of this model in docs/demo.md: not judged"
    bound, steps = target["bits_per_char"], target["steps"]
    what = (f"target: held-out bits per character <= {bound} after {steps} steps "
            f"({target['source']}; the docs state no target for the transformer, none for a "
            f"GPU)")
    if row.get("steps") != steps:
        return f"{what}: not judged, the run had {row.get('steps')} steps"
    bpc = row.get("held_out", {}).get("bits_per_char")
    if bpc is None or row.get("timed_out"):
        why = "stopped by the time limit" if row.get("timed_out") else \
            f"no held-out figure (exit {row.get('exit')})"
        return f"{what}: NOT met ({why})"
    met = bool(row["finite"]) and round(bpc, 2) <= bound
    return f"{what}: {bpc:.3f}{'' if row['finite'] else ', not finite'}: " \
           f"{'met' if met else 'NOT met'}"


def demo_section(record: dict, title: str, command: str, commit: str, date: str) -> str:
    """The demo stage's section for benchmarks/gpu/RESULTS.md: when, where, its row, the
    verdict."""
    env, row = record["environment"], record["row"]
    where, versions = _where(env)
    held = row.get("held_out", {})
    size = "the kit's smoke size" if record.get("tiny") else "the demo's default flags"
    cells = [row["model"], row.get("steps"), row["device"], row.get("precision"),
             _num(held.get("loss"), 4), _num(held.get("bits_per_char"), 3),
             _num(held.get("accuracy"), 3),
             {True: "yes", False: "**no**", None: "unknown"}[row["finite"]],
             _num(row.get("steps_per_s"), 1), f"{row['seconds']:.0f}",
             row.get("stopped_by") or "", record["targets"][0].rpartition(": ")[2]]
    lines = [f"#### {title}: {date}", "",
             f"{where}; {versions}; fxtrain {commit}; command: `{command}`", "",
             f"`{record['command']}` ({size}) in a process of its own, "
             f"stopped after {record['timeout']:.0f} s if still running; the precision is the "
             f"demo's choice on this machine (`native_bf16()`), the device the one fit's summary "
             f"names; steps/s after the first (compiling) step, callbacks, evaluations and "
             f"checkpoints included.", "",
             "| model | steps | device | precision | held-out loss | bits/char | accuracy | "
             "finite | steps/s | wall s | stopped by | target |", "|---" * 12 + "|",
             "| " + " | ".join(str(c) for c in cells) + " |", ""]
    if "memory_gib" in env and row["device"] == "cpu":
        lines += ["- The demo trained on the CPU beside the GPU: `fxtrain demo` builds its model "
                  "there and has no device flag.", ""]
    lines += [f"- {line}" for line in record["targets"]]
    return "\n".join(lines) + "\n"


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
