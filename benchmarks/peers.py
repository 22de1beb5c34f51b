"""Steps per second of fxtrain and its peers training the same MLP, interleaved, on one core.

Every variant trains common.make_mlp with cross-entropy and AdamW (common.LR, B1, B2, EPS, WD)
on the same fixed batches (common.make_batches: 8 pre-made batches, taken in turn), so data
loading costs nothing and the rates compare the training loops themselves:

  eager            nn.Module + torch.optim.AdamW (its defaults: the for-loop implementation on
                   CPU), zero_grad / backward / step: the plain PyTorch loop, the baseline
  eager_foreach    the same with AdamW(foreach=True)
  torch_compile    a hand-written functional step (functional_call + grad + AdamW maths) under
                   torch.compile(fullgraph=True), in a Python loop (step_overhead's (c))
  fxtrain_step     fx.make_train_step + fx.optim.adamw under torch.compile(fullgraph=True), in a
                   Python loop, no fit and no callbacks (step_overhead's (d))
  fxtrain          fx.fit with that compiled step and fxtrain's standard host callbacks:
                   progress_bar("loss"), summary, throughput, lr_monitor (the bars and the table
                   written to os.devnull; the monitors publish to the `fxtrain` logger); the
                   batches, the same in the same order, from fx.data.Batches (shuffle off)
  fxtrain_nan_guard  the same with nan_guard("skip") inside the compiled step
  fxtrain_k8       fxtrain with a step taking 8 steps per compiled call (steps_per_call=8; 2 in
                   a --smoke run, which reports no figure: a quarter of the graph to compile)
  fxtrain_k8_precompiled  the same, the step through fx.precompiled instead of torch.compile
  lightning        pytorch_lightning.Trainer with its defaults (progress bar, model summary,
                   TensorBoard logger and checkpointing into a temporary folder); the module logs
                   its loss with self.log(prog_bar=True), as Lightning's docs show, so both
                   progress bars display the loss
  lightning_bare   Trainer(enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False), the module without self.log
  ignite           ignite.engine.create_supervised_trainer with its defaults
  jax_optax        jax.jit of value_and_grad + optax.adamw (params and optimizer state donated),
                   the same initial weights, in a Python loop; JAX's defaults otherwise (its
                   asynchronous dispatch included)

Each variant is a function ``(sizes, batches) -> run``: ``run(steps)`` trains that many more
steps and returns the (wall, CPU) seconds of the steady state, and ``steps_per_sec(run, steps)``
gives the rate. Loops written by hand are timed over ``steps`` steps after a warm-up (which
compiles). fx.fit, Lightning and Ignite run their own loops, so each is timed as the difference
of a run of ``steps + steps // 4`` steps and one of ``steps // 4``: their start-up (trainer
set-up, summary, logger folders, the checkpoint Lightning writes at the end) cancels out. Their
data is one epoch longer than any run, so no epoch boundary falls inside a timed run.

Rounds interleave the variants (in an order rotated every round) and medians of the rounds are
reported. The process is pinned to one CPU (sched_setaffinity), torch uses one thread and XLA
single-threaded matmuls (--xla_cpu_multi_thread_eigen=false; XLA has no flag for the size of its
own thread pool, and the pinning keeps whatever it runs on the same core). The process's CPU
time over wall time is reported per variant: 1.00 is one core kept busy.

Run: python benchmarks/peers.py [--rounds 5] [--steps 1000] [--sizes tiny large] [--smoke]
(the larger MLP runs steps // 5 steps per round). Prints steps/s and ratios against ``eager``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

import fxtrain as fx
from common import (B1, B2, EPS, LR, SIZES, WD, arguments, backend, cross_entropy, make_batches,
                    make_mlp, scratch_folder)
from step_overhead import eager_variant, fxtrain_variant, handwritten_variant

XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"  # XLA has no flag for its own pool's size
LARGE_STEPS = 5  # the larger MLP runs steps // LARGE_STEPS steps per round
EPOCH = 10**6  # batches per epoch for the framework loops: longer than any run
K = 8  # the fxtrain_k8 rows' steps per compiled call; a --smoke run's: SMOKE_K
# the same code with a quarter of the graph: the smoke's cold Inductor compile of
# fx.precompiled's 8-step graph took 42 of its 75 CPU-s (2 steps: 21)
SMOKE_K = 2

Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)
Run = Callable[[int], Timing]  # steps -> the time they took, in the steady state


# -- timing ---------------------------------------------------------------------------------


def clocked(fn: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def manual(step: Callable, batches: list, sync: Callable = lambda out: None) -> Run:
    """A loop written by hand: ``step(batch)`` on the batches in turn, ``sync`` on the last
    output (JAX dispatches asynchronously)."""

    def run(steps: int) -> Timing:
        def loop():
            out = None
            for i in range(steps):
                out = step(batches[i % len(batches)])
            sync(out)

        return clocked(loop)

    return run


def long_minus_short(run_once: Callable[[int], Timing]) -> Run:
    """A framework's own loop: a run of ``steps + steps // 4`` minus one of ``steps // 4``, so
    what every run does once (set-up, start-up, teardown) cancels out."""

    def run(steps: int) -> Timing:
        short = max(steps // 4, 1)
        (long_wall, long_cpu), (short_wall, short_cpu) = run_once(steps + short), run_once(short)
        if long_wall <= short_wall:  # noise above the run itself (only in --smoke): keep it all
            return long_wall * steps / (steps + short), long_cpu * steps / (steps + short)
        return long_wall - short_wall, long_cpu - short_cpu

    return run


def steps_per_sec(run: Run, steps: int) -> tuple[float, float]:
    """(steps per second, CPU seconds per wall second) of ``steps`` steps of ``run``."""
    wall, cpu = run(steps)
    return steps / wall, cpu / wall


class Cycle:
    """``length`` batches, taken in turn from a fixed list: the same data for every framework."""

    def __init__(self, batches: list, length: int = EPOCH):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        n = len(self.batches)
        return (self.batches[i % n] for i in range(self.length))


def repeated(batches: list, limit: int = 200 * 2**20) -> fx.data.Batches:
    """``batches`` in turn, as ``fx.data.Batches`` (shuffle off): the same batches as ``Cycle``
    gives the other loops, from the tensors fxtrain takes them from (each batch a view, and a
    call of K steps takes its K batches as one view). Repeated up to 1000 times within
    ``limit`` bytes (under Batches' 256 MiB, above which it would copy each batch): an epoch
    longer than any run (8,000 batches of the tiny MLP, 520 of the larger; runs are 1,250 and
    250 steps)."""
    size = sum(t.numel() * t.element_size() for batch in batches for t in batch)
    passes = max(1, min(1000, limit // size))
    columns = [torch.cat([b[i] for b in batches] * passes) for i in range(2)]
    return fx.data.Batches(tuple(columns), len(batches[0][1]), shuffle=False)


@contextlib.contextmanager
def quiet():
    """Standard output, standard error and warnings go nowhere (progress bars, start-up notes)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the variants: (sizes, batches) -> Run --------------------------------------------------


def eager(sizes, batches, **options) -> Run:
    return manual(eager_variant(sizes, **options), batches)


def torch_compile(sizes, batches) -> Run:
    return manual(handwritten_variant(sizes), batches)


def fxtrain_step(sizes, batches) -> Run:
    return manual(fxtrain_variant(sizes), batches)


def standard_callbacks(sink, every: int = 50) -> list:
    """fxtrain's standard host callbacks, their output going to ``sink``; the monitors publish
    every ``every`` steps (a multiple of the steps per call)."""
    return [fx.callbacks.progress_bar("loss", file=sink), fx.callbacks.summary(file=sink),
            fx.callbacks.throughput(every), fx.callbacks.lr_monitor(every)]


def fxtrain_fit(sizes, batches, in_step=(), steps_per_call: int = 1,
                precompiled: bool = False) -> Run:
    """fx.fit with the standard host callbacks; ``in_step`` callbacks run inside the step, which
    takes ``steps_per_call`` steps per call (runs are then rounded up to whole calls, and their
    time scaled back to the steps asked for); ``precompiled``: the step through fx.precompiled
    (saved to a temporary file by its first call), not torch.compile."""
    in_step, k = list(in_step), steps_per_call
    sink = open(os.devnull, "w")  # noqa: SIM115 - open as long as the process
    atexit.register(sink.close)
    host = standard_callbacks(sink, every=50 if k == 1 else 6 * k)
    tx = fx.optim.adamw(LR, B1, B2, EPS, WD)
    holder = [fx.TrainState.create(make_mlp(sizes), tx, callbacks=in_step)]
    step = fx.make_train_step(cross_entropy, callbacks=in_step, steps_per_call=k)
    if precompiled:
        step = fx.precompiled(step, os.path.join(scratch_folder(), "step.bin"))
    else:
        step = torch.compile(step, fullgraph=True, backend=backend())
    data = repeated(batches)

    def run_once(n: int) -> Timing:
        state = holder[0].replace(data=None)  # a new pass over the data
        whole = -(-n // k) * k

        def fit():
            holder[0] = fx.fit(state, step, data, callbacks=host,
                               max_steps=int(state.step) + whole)

        wall, cpu = clocked(fit)
        return wall * n / whole, cpu * n / whole

    return long_minus_short(run_once)


def lightning(sizes, batches, *, bare: bool = False) -> Run:
    # tensorboard imports TensorFlow for its file writer when TensorFlow is installed (fxtrain's
    # clu extra installs it); this module is tensorboard's own switch for its TensorFlow-free
    # build, which is what Lightning's default logger gets without TensorFlow.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    options = dict(enable_progress_bar=False, enable_model_summary=False, logger=False,
                   enable_checkpointing=False) if bare else {}

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_mlp(sizes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            if not bare:
                self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR, betas=(B1, B2), eps=EPS,
                                     weight_decay=WD)

    module, data = MLP(), Cycle(batches)
    root = scratch_folder("fxtrain-bench-lightning-")

    def run_once(n: int) -> Timing:
        def fit():
            with quiet():
                trainer = pl.Trainer(max_steps=n, default_root_dir=root, accelerator="cpu",
                                     devices=1, **options)
                trainer.fit(module, data)

        timing = clocked(fit)
        shutil.rmtree(Path(root) / "lightning_logs", ignore_errors=True)  # logs, checkpoints
        return timing

    return long_minus_short(run_once)


def ignite(sizes, batches) -> Run:
    from ignite.engine import create_supervised_trainer

    model = make_mlp(sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    data = Cycle(batches)

    def run_once(n: int) -> Timing:
        def fit():
            create_supervised_trainer(model, opt, F.cross_entropy).run(data, max_epochs=1,
                                                                       epoch_length=n)

        return clocked(fit)

    return long_minus_short(run_once)


def jax_optax(sizes, batches) -> Run:
    import jax
    import jax.numpy as jnp
    import optax

    linears = [m for m in make_mlp(sizes) if isinstance(m, torch.nn.Linear)]
    params = [(jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy()))
              for m in linears]  # the torch model's initial weights, as x @ w + b
    tx = optax.adamw(LR, B1, B2, EPS, weight_decay=WD)

    def loss_fn(params, x, y):
        for i, (w, b) in enumerate(params):
            x = x @ w + b
            x = jax.nn.relu(x) if i < len(params) - 1 else x
        return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 1))
    holder = [params, tx.init(params)]

    def step(batch):
        holder[0], holder[1], loss = compiled(holder[0], holder[1], *batch)
        return loss

    jax_batches = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in batches]
    return manual(step, jax_batches, sync=lambda loss: jax.block_until_ready((loss, holder)))


def variants(k: int = K) -> dict[str, Callable]:
    """The variants by name, the fxtrain_k8 rows at ``k`` steps per compiled call."""
    return {
        "eager": eager,
        "eager_foreach": lambda s, b: eager(s, b, foreach=True),
        "torch_compile": torch_compile,
        "fxtrain_step": fxtrain_step,
        "fxtrain": fxtrain_fit,
        "fxtrain_nan_guard": lambda s, b: fxtrain_fit(s, b, [fx.callbacks.nan_guard("skip")]),
        "fxtrain_k8": lambda s, b: fxtrain_fit(s, b, steps_per_call=k),
        "fxtrain_k8_precompiled": lambda s, b: fxtrain_fit(s, b, steps_per_call=k,
                                                           precompiled=True),
        "lightning": lightning,
        "lightning_bare": lambda s, b: lightning(s, b, bare=True),
        "ignite": ignite,
        "jax_optax": jax_optax,
    }


VARIANTS = variants()


# -- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def one_core():
    """The process on one CPU, torch on one thread, XLA's matmuls on one thread and JAX on its
    CPU backend (the flags are read when JAX starts its client); all restored afterwards."""
    threads, env = torch.get_num_threads(), dict(os.environ)
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    torch.set_num_threads(1)
    if cpus:
        os.sched_setaffinity(0, {max(cpus)})
    os.environ["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_ONE_THREAD}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cpus:
            os.sched_setaffinity(0, cpus)
        for key in ("XLA_FLAGS", "JAX_PLATFORMS"):
            if key in env:
                os.environ[key] = env[key]
            else:
                os.environ.pop(key, None)


def measure(size: str, rounds: int, steps: int, variants=VARIANTS) -> dict[str, dict]:
    """Medians over ``rounds`` interleaved rounds: {variant: {"steps_per_sec", "cpu_use"}}."""
    sizes, batch = SIZES[size]
    batches = make_batches(sizes, batch)
    torch._dynamo.reset()  # as in a fresh process: no dynamic-shape recompiles of the last size
    runs = {name: make(sizes, batches) for name, make in variants.items()}
    for run in runs.values():  # warm-up: compilation, first calls, lazy optimizer state
        run(max(steps // 10, 5))
    names = list(runs)
    rates: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(steps_per_sec(runs[name], steps))
            if torch.get_num_threads() != 1:
                raise RuntimeError(f"{name} changed torch's thread count")
    return {name: {"steps_per_sec": statistics.median(r for r, _ in rs),
                   "cpu_use": statistics.median(c for _, c in rs)} for name, rs in rates.items()}


def report(size: str, med: dict[str, dict]) -> None:
    base = med["eager"]["steps_per_sec"]
    print(f"\n{size}: layers {SIZES[size][0]}, batch {SIZES[size][1]}")
    print(f"{'variant':24s} {'steps/s':>10s} {'vs eager':>9s} {'cpu/wall':>9s}")
    for name, m in med.items():
        rate = m["steps_per_sec"]
        print(f"{name:24s} {rate:10.0f} {rate / base:8.2f}x {m['cpu_use']:9.2f}")


def main(argv=None) -> dict:
    args = arguments(__doc__, argv, rounds=5, steps=1000)
    k = SMOKE_K if args.smoke else K
    results = {}
    with one_core():
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "all"
        print(f"torch {torch.__version__}, fxtrain {fx.__version__}, threads "
              f"{torch.get_num_threads()}, CPUs {cpus}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}"
              + (f"; the k8 rows at {k} steps per call (--smoke)" if k != K else ""))
        for size in args.sizes:
            steps = args.steps if size == "tiny" else max(args.steps // LARGE_STEPS, 5)
            results[size] = measure(size, args.rounds, steps, variants(k))
            report(size, results[size])
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
