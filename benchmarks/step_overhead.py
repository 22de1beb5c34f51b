"""Steps per second of one training step, five ways, interleaved in one run (one torch thread).

(a) eager: nn.Module + torch.optim.AdamW(foreach=True)
(b) eager: nn.Module + torch.optim.AdamW(fused=True)
(c) a hand-written functional step (functional_call + grad + AdamW maths) under torch.compile
(d) fxtrain: make_train_step + fx.optim.adamw under torch.compile(fullgraph=True)
(d') the same step through fx.precompiled (compiled ahead of time, saved, loaded back: called
    without Dynamo's frame evaluation, its guards checked by the loaded step)
(d'') the same step through fx.compile (Inductor's settings held for each call)

and the cost of the host loop around (d), on the same data stream (fx.data.Batches):
(e) a bare Python loop: batch, position = data.next(position); state = step(state, batch)
(f) fx.fit with no callbacks
(g) fx.fit with the standard host set: progress_bar, summary, throughput, lr_monitor, timer
(h) fx.fit with log_metrics(TensorBoardWriter, every=50) + model_watch(every=500), its step
    built with grad_stats=True (the per-layer gradient norms model_watch writes): logging's cost
    against (f)
and, on the tiny MLP, (d) with one feature of the step in use at a time (FEATURES: keyed
dropout, grad_stats, nan_guard in the step, donation, bf16-mixed, gradient clipping): the cost of
each per step. fit runs are timed as the difference of a long and a short run, so its one-off
start-up (summary table, bars) does not count per step.

Run: python benchmarks/step_overhead.py [--rounds 7] [--steps 200] [--smoke]
Prints steps/s per variant (median over rounds) and ratios against (a).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import fxtrain as fx
from common import (B1, B2, EPS, LR, SIZES, WD, arguments, backend, cross_entropy, make_batches,
                    scratch_folder,
                    make_mlp)


def eager_variant(sizes, **options):
    """nn.Module + torch.optim.AdamW; ``options`` pick its implementation (foreach, fused)."""
    model = make_mlp(sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD,
                            **options)

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def handwritten_variant(sizes):
    model = make_mlp(sizes)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = {"t": torch.zeros((), dtype=torch.int64),
             "m": {k: torch.zeros_like(v) for k, v in params.items()},
             "v": {k: torch.zeros_like(v) for k, v in params.items()}}

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    @torch.compile(fullgraph=True, backend=backend())
    def compiled(p, s, x, y):
        g, loss = grad_and_value(loss_fn)(p, x, y)
        t = s["t"] + 1
        bc1 = 1 - torch.pow(torch.tensor(B1), t.float())
        bc2 = 1 - torch.pow(torch.tensor(B2), t.float())
        m = {k: torch.lerp(s["m"][k], g[k], 1 - B1) for k in p}
        v = {k: s["v"][k] * B2 + (1 - B2) * g[k] * g[k] for k in p}
        new = {k: p[k] - LR * ((m[k] / bc1) / (torch.sqrt(v[k]) / torch.sqrt(bc2) + EPS) + WD * p[k])
               for k in p}
        return new, {"t": t, "m": m, "v": v}, loss

    holder = [params, state]

    def step(batch):
        holder[0], holder[1], loss = compiled(holder[0], holder[1], *batch)
        return loss

    return step


def fxtrain_variant(sizes, precompiled: bool = False, feature: str = "none",
                    fx_compile: bool = False):
    """(d), or (d') through fx.precompiled, whose first call (in the warm-up) compiles the step
    and saves it (a later process loads it: compile_time.py times that; the loaded step is
    called as the saved one is), or (d'') through fx.compile (torch.compile with the settings
    held for each call). ``feature``: one feature of the step in use (``FEATURES``: the
    per-step cost of each, against (d) with none)."""
    model = make_mlp(sizes)
    if feature == "dropout":  # keyed randomness in use: a dropout after the hidden layer
        model = nn.Sequential(*model[:2], nn.Dropout(0.1), *model[2:])
    tx = fx.optim.adamw(LR, B1, B2, EPS, WD)
    if feature == "clip":
        tx = fx.optim.chain(fx.optim.clip_by_global_norm(1.0), tx)
    in_step = [fx.callbacks.nan_guard("skip")] if feature == "nan_guard" else []
    options = {"grad_stats": {"grad_stats": True}, "donate": {"donate": True},
               "bf16_mixed": {"precision": "bf16-mixed"}}.get(feature, {})
    state = fx.TrainState.create(model, tx, callbacks=in_step)
    train_step = fx.make_train_step(cross_entropy, callbacks=in_step, **options)
    if precompiled:
        train_step = fx.precompiled(train_step, os.path.join(scratch_folder(), "step.bin"))
    elif fx_compile:
        train_step = fx.compile(train_step, state, backend=backend())
    else:
        train_step = torch.compile(train_step, fullgraph=True, backend=backend())
    holder = [state]

    def step(batch):
        holder[0], metrics = train_step(holder[0], batch)
        return metrics["loss"]

    return step


FEATURES = {  # the step's features, one in use in each; "none" is (d) again, in the same rounds
    name: (lambda f: lambda s: fxtrain_variant(s, feature=f))(name)
    for name in ("none", "dropout", "grad_stats", "nan_guard", "donate", "bf16_mixed", "clip")}


VARIANTS = {
    "a_eager_foreach": lambda s: eager_variant(s, foreach=True),
    "b_eager_fused": lambda s: eager_variant(s, fused=True),
    "c_handwritten_compiled": handwritten_variant,
    "d_fxtrain_compiled": fxtrain_variant,
    "d2_fxtrain_precompiled": lambda s: fxtrain_variant(s, precompiled=True),
    "d3_fxtrain_fx_compile": lambda s: fxtrain_variant(s, fx_compile=True),
}


def loop_setup(sizes, batch):
    """A compiled fxtrain step, its state, and a Batches stream of 64 batches."""
    state = fx.TrainState.create(make_mlp(sizes), fx.optim.adamw(LR, B1, B2, EPS, WD))
    g = torch.Generator().manual_seed(0)
    n = batch * 64
    data = fx.data.Batches((torch.randn(n, sizes[0], generator=g),
                            torch.randint(0, sizes[-1], (n,), generator=g)), batch)
    return state, torch.compile(fx.make_train_step(cross_entropy), fullgraph=True,
                                backend=backend()), data


def host_callbacks():
    sink = open(os.devnull, "w")  # noqa: SIM115 - the bars and the table write somewhere quiet
    return [fx.callbacks.progress_bar(file=sink), fx.callbacks.summary(file=sink),
            fx.callbacks.throughput(), fx.callbacks.lr_monitor(), fx.callbacks.timer(1e9)]


def loop_variants(sizes, batch):
    """Each returns seconds per step over ``steps`` steps."""
    state, step, data = loop_setup(sizes, batch)
    holder = [state]

    def bare(steps):
        state, position = holder[0].replace(data=None, callbacks=None), data.init()
        start = time.perf_counter()
        for _ in range(steps):
            batch, position, _ = data.next(position)
            state, _ = step(state, batch)
        holder[0] = state
        return (time.perf_counter() - start) / steps

    def fit(callbacks):
        def run(n):
            state = holder[0].replace(data=None, callbacks=None)
            start = time.perf_counter()
            holder[0] = fx.fit(state, step, data, callbacks=callbacks(),
                               max_steps=int(state.step) + n)
            return time.perf_counter() - start

        return lambda steps: (run(steps + steps // 4) - run(steps // 4)) / steps

    return {"e_bare_loop": bare, "f_fit": fit(list), "g_fit_host_callbacks": fit(host_callbacks),
            "h_fit_logging": logging_variant(holder, data)}


def logging_variant(holder, data):
    """fit with log_metrics + model_watch writing TensorBoard files to a temporary folder."""
    writer = fx.logging.TensorBoardWriter(scratch_folder())
    step = torch.compile(fx.make_train_step(cross_entropy, grad_stats=True), fullgraph=True,
                         backend=backend())
    callbacks = [fx.callbacks.log_metrics(writer, every=50),
                 fx.callbacks.model_watch(writer, every=500)]

    def run(n):
        state = holder[0].replace(data=None, callbacks=None)
        start = time.perf_counter()
        holder[0] = fx.fit(state, step, data, callbacks=callbacks, max_steps=int(state.step) + n)
        return time.perf_counter() - start

    return lambda steps: (run(steps + steps // 4) - run(steps // 4)) / steps


def measure_loops(size, rounds, steps):
    sizes, batch = SIZES[size]
    runs = loop_variants(sizes, batch)
    for run in runs.values():
        run(20)
    per_step = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            per_step[name].append(run(steps))
    return {name: 1.0 / statistics.median(t) for name, t in per_step.items()}


def time_steps(step, batches, steps):
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps / (time.perf_counter() - start)


def measure(size, rounds, steps, variants=VARIANTS):
    sizes, batch = SIZES[size]
    batches = make_batches(sizes, batch)
    steps_fns = {name: make(sizes) for name, make in variants.items()}
    for fn in steps_fns.values():  # warm-up and compile
        time_steps(fn, batches, 20)
    rates = {name: [] for name in steps_fns}
    for _ in range(rounds):  # interleaved: every round times every variant
        for name, fn in steps_fns.items():
            rates[name].append(time_steps(fn, batches, steps))
    return {name: statistics.median(r) for name, r in rates.items()}


def report(size, med):
    base = med["a_eager_foreach"]
    print(f"\n{size}: {SIZES[size]}")
    print(f"{'variant':26s} {'steps/s':>10s} {'vs (a)':>8s}")
    for name, rate in med.items():
        print(f"{name:26s} {rate:10.0f} {rate / base:8.2f}x")
    d, c = med["d_fxtrain_compiled"], med["c_handwritten_compiled"]
    print(f"(d) / (c) = {d / c:.3f}")
    if "d2_fxtrain_precompiled" in med:
        print(f"(d') / (c) = {med['d2_fxtrain_precompiled'] / c:.3f}")
    if "e_bare_loop" in med:
        e = med["e_bare_loop"]
        for name in ("f_fit", "g_fit_host_callbacks", "h_fit_logging"):
            print(f"({name[0]}) time per step / (e) = {e / med[name]:.3f}")
        print(f"(h) time per step / (f) = {med['f_fit'] / med['h_fit_logging']:.3f}")


def main(argv=None):
    args = arguments(__doc__, argv, rounds=7, steps=200)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, fxtrain {fx.__version__}, threads {torch.get_num_threads()}")
    results = {}
    for size in args.sizes:
        # as in a fresh process: otherwise the second size's steps recompile with dynamic shapes
        torch._dynamo.reset()
        results[size] = measure(size, args.rounds, args.steps)
        if size == "tiny":  # the loop's cost matters where steps are short
            results[size].update(measure_loops(size, args.rounds, args.steps * 2))
        report(size, results[size])
    torch._dynamo.reset()
    results["features"] = measure("tiny", args.rounds, args.steps, FEATURES)
    none = results["features"]["none"]
    print("\ntiny, one feature of the step in use (time per step vs none):")
    for name, rate in results["features"].items():
        print(f"  {name:12s} {rate:8.0f}/s {none / rate:6.3f}")
    return results


if __name__ == "__main__":
    main()
