"""The GPU kit's rows as figures and text (``gpu_transformer.py``): MFU and the ratios to the fair
baselines, the targets met or not, the chunked losses against the whole logits, and the
markdown section a stage writes (``OUT/<stage>.md``, appended to benchmarks/gpu/RESULTS.md).

The fair baselines are ``BASELINES``: the loss inside the compiled module (``loop``) and the
whole step under one ``torch.compile`` (``loop_step``). Every row gets its ratios to each, and
a target is judged against the stronger for its figure: tokens/s against the faster, memory
against the leaner. ``loop_eager_loss`` (the loss outside the compiled module, on a float32
copy of the logits) is a row of its own, never a baseline.
"""

from __future__ import annotations

BASELINES = ("loop", "loop_step")
LABELS = {
    "loop": "loop: `torch.compile` of the model with its loss inside, fused AdamW",
    "loop_step": "loop_step: forward, backward and AdamW under one `torch.compile`",
    "loop_eager_loss": "loop_eager_loss (extra, not a baseline): loss outside the compiled "
                       "model, on a float32 copy of the logits",
    "fx_func": "`fx.fit`, `torch.func` step",
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
    (``*_vs_best``: the faster for tokens/s, the leaner for memory), to each good row."""
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


def summary(row: dict) -> str:
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
    env = record["environment"]
    where = (f"{env['device']} ({env['memory_gib']:.1f} GiB, capability {env['capability']}), "
             f"driver {env.get('driver', '?')}" if "memory_gib" in env else env["device"])
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "python", "transformers",
                                                    "liger_kernel") if env.get(k))
    probe = record.get("probe")
    sizing = (f" (the probe, the loop's compiled steps at batch 2 and 4: "
              f"{probe['per_sequence'] / 2**20:.0f} MiB a sequence, "
              f"{probe['fixed'] / 2**30:.2f} GiB fixed, 80% of "
              f"{probe['total'] / 2**30:.1f} GiB)" if probe else "")
    big = (f"; {', '.join(record['big_variants'])} at batch {record['big_batch']}, "
           f"{record.get('big_why', '')}" if record.get("big_variants") else "")
    peak = (f"MFU over {record['peak_tflops']} TFLOP/s (dense bf16)" if record.get("peak_tflops")
            else "MFU not computed (no peak known for this device)")
    lines = [f"#### {title}: {date}", "",
             f"{where}; {versions}; fxtrain {commit}; command: `{command}`", "",
             f"`--model {record['model']}`, sequence {record['seq']}, {record['precision']}, "
             f"AdamW (lr {record['lr']}, weight decay {record['weight_decay']} on every "
             f"parameter); batch {record['batch']}{sizing}{big}; {record['steps']} timed steps "
             f"after {record['warmup']}; {peak}, "
             f"{_flops(record)} a token. Each variant in its own process; ratios to the fair "
             f"loops of the same run.", "", markdown(record), ""]
    lines += [f"- {line}" for line in record.get("targets", []) +
              record.get("against_full_logits", [])]
    return "\n".join(lines) + "\n"


def _flops(record: dict) -> str:
    rows = [r for rows in record["dropouts"].values() for r in rows.values()
            if "flops_per_token" in r]
    return f"{rows[0]['flops_per_token'] / 1e6:,.1f} MFLOP" if rows else "n/a MFLOP"
