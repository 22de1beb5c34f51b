"""Every precision policy trained long enough to go wrong (issue 74): the demo's models under
``32``, ``bf16-mixed``, ``16-mixed``, ``bf16-true`` and ``fp8`` (torchao's float8, emulated on
the CPU), eager and compiled, on both gradient paths, their held-out loss curves against
float32's.

    python benchmarks/precision.py                      # the whole matrix, a table on stdout
    python benchmarks/precision.py --models mlp --steps 60 --policies 32 bf16-mixed
    python benchmarks/precision.py --markdown docs/precision-matrix.md   # the table, as markdown

Every cell trains from the same initial weights, data order and dropout keys as float32's
(``fx.TrainState.create(..., seed=0)``), ``steps`` steps of the demo's optimizer (AdamW under a
warmup-cosine schedule, clipped at 1), and evaluates the held-out loss every ``eval_every``
steps. A cell passes when every point of its curve stays within the policy's band of
float32's point (``band``); a policy that cannot train a path is refused there by name, and
the table says so.

The band. A policy rounds what it computes to its unit roundoff ``u`` (``2**-8`` for
bfloat16's 8-bit significand, ``2**-11`` for float16's; float8's products are rounded to
e4m3's 3 bits, ``2**-4``, then accumulated and scaled in bfloat16). Where the master weights
stay float32 (``bf16-mixed``, ``16-mixed``, ``fp8``) a rounding perturbs one step's gradient by
about ``u`` relatively, and the update (``lr`` times Adam's normalised direction) passes on
``u * lr`` per coordinate: far below the weights' own scale, so the roundings do not
accumulate into the curve beyond the first ``u``: the band is ``K * u`` of float32's loss, with
a safety factor ``K = 4``. Where the weights themselves are bfloat16 (``bf16-true``) every
update is rounded to ``u`` of the weight, and ``n`` steps of independent roundings walk about
``sqrt(n)`` of them: ``K * u * sqrt(n)``. Float32 against itself: its reordering noise,
``2**-20``. ``16-mixed`` rounds finer (``2**-11``) but its dynamic loss scale starts at
``2**16`` and skips the steps whose scaled gradients overflow while it backs off to their
range: the curve then lags float32's by those steps, which no roundoff bound covers; its band
is bfloat16's (the transformer's curve measured 0.26% from float32's, past ``4 * 2**-11``).
For the 60 steps the tests run: 1.6% (``bf16-mixed``, ``16-mixed``), 25% (``fp8``), 12%
(``bf16-true``). A planted bug (the master weights rounded to bfloat16 after
each update, the loss in bfloat16 without its upcast) leaves its band
(tests/e2e/test_precision_matrix_processes.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxtrain as fx  # noqa: E402
from fxtrain.apps.demo import tasks  # noqa: E402
from fxtrain.apps.demo.job import DemoConfig, _optimizer  # noqa: E402

POLICIES = ("32", "bf16-mixed", "16-mixed", "bf16-true", "fp8")
UNIT_ROUNDOFF = {"32": 2.0**-24, "bf16-mixed": 2.0**-8, "16-mixed": 2.0**-11,
                 "bf16-true": 2.0**-8, "fp8": 2.0**-4}
SAFETY = 4.0
LOW_PRECISION_MASTERS = ("bf16-true",)
BATCH = {"mlp": 64, "transformer": 16}
LR = {"mlp": 3e-3, "transformer": 3e-3}


def band(policy: str, steps: int) -> float:
    """The relative band of ``policy``'s held-out loss around float32's after ``steps``."""
    if policy == "16-mixed":  # the loss scale's skipped steps, not its roundoff (see above)
        return band("bf16-mixed", steps)
    walk = math.sqrt(steps) if policy in LOW_PRECISION_MASTERS else 1.0
    return SAFETY * UNIT_ROUNDOFF[policy] * walk + 2.0**-20


@dataclasses.dataclass(frozen=True)
class Cell:
    """One policy trained on one path: its held-out curve ``[(step, loss)]``, or why not."""

    model: str
    policy: str
    compiled: bool
    autodiff: str
    plant: str | None = None  # a planted bug (PLANTS)
    curve: tuple[tuple[int, float], ...] = ()
    refused: str | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.policy if self.plant is None else f"{self.policy} + {self.plant}"

    @property
    def path(self) -> str:
        return f"{'compiled' if self.compiled else 'eager'}/{self.autodiff}"


def _masters_in_bfloat16() -> fx.optim.GradientTransformation:
    """A planted bug: the updates that leave the master weights rounded to bfloat16 (a
    ``"bf16-mixed"`` step that forgot to keep its float32 copy)."""
    def update(updates, state, params=None):
        return {k: (params[k] + u).to(torch.bfloat16).float() - params[k]
                for k, u in updates.items()}, state
    return fx.optim.GradientTransformation(lambda params: None, update)


def _loss_in_bfloat16(state, params, batch):
    """A planted bug: the loss computed on bfloat16 logits, no upcast."""
    x, y = batch
    logits = state.apply(params, x)
    with torch.autocast("cpu", enabled=False):
        logits = logits.to(torch.bfloat16).flatten(0, -2)
        loss = torch.nn.functional.cross_entropy(logits, y.flatten())
    return loss.float(), {"accuracy": (logits.argmax(-1) == y.flatten()).float().mean()}


PLANTS = {"masters-in-bf16": "the master weights rounded to bfloat16 after each update",
          "loss-in-bf16": "the loss on bfloat16 logits without an upcast"}


def _state_and_step(task, policy: str, compiled: bool, autodiff: str, steps: int, lr: float,
                    plant: str | None = None):
    model = task.model
    precision = fx.precision.policy(policy)
    if policy == "bf16-true":
        model = model.to(torch.bfloat16)
    model = precision.convert(model)
    config = DemoConfig(steps=steps, lr=lr)
    tx = _optimizer(config)
    if plant == "masters-in-bf16":
        tx = fx.optim.chain(tx, _masters_in_bfloat16())
    state = fx.TrainState.create(model, tx, seed=0)
    loss_fn = _loss_in_bfloat16 if plant == "loss-in-bf16" else task.loss_fn
    if policy == "bf16-true":  # the inputs in the parameters' dtype, as Lightning's plugin does
        loss_fn = _in_bfloat16(loss_fn)
    step = fx.make_train_step(loss_fn, precision=precision, autodiff=autodiff)
    return state, fx.compile(step, state) if compiled else step  # a bfloat16 step's options


def _in_bfloat16(fn):
    """``fn`` with the batch's floating-point inputs cast to bfloat16 (labels stay)."""
    def cast(state, *args):
        *head, batch = args
        x, y = batch
        return fn(state, *head, (x.to(torch.bfloat16) if x.is_floating_point() else x, y))
    return cast


def train_cell(model: str, policy: str, compiled: bool, autodiff: str, *, steps: int = 60,
               eval_every: int = 10, eval_examples: int = 256, plant: str | None = None) -> Cell:
    """Trains the demo's ``model`` under ``policy`` for ``steps`` and records its curve."""
    cell = Cell(model, policy, compiled, autodiff, plant=plant)
    if policy == "fp8":
        policy_value = fx.precision.float8(emulate=True)
    else:
        policy_value = policy
    task = tasks.make_task(model, 0)
    torch._dynamo.reset()  # a sweep: each cell's step is a new compile of the same code
    start = time.perf_counter()
    try:
        state, step = _state_and_step(task, policy_value, compiled, autodiff, steps, LR[model],
                                      plant=plant)
    except (ValueError, TypeError, NotImplementedError) as e:
        return dataclasses.replace(cell, refused=str(e).splitlines()[0])
    x, y = task.test
    held_out = [(x[:eval_examples], y[:eval_examples])]
    data = fx.data.Batches(task.train, BATCH[model], seed=0)
    curve = []

    def record(state, event):
        curve.append((int(event.step), float(event.metrics["loss"])))
        return state, fx.Control()

    try:
        fx.fit(state, step, data, max_steps=steps, eval_step=fx.make_eval_step(
                   _in_bfloat16(task.eval_fn) if policy == "bf16-true" else task.eval_fn),
               eval_data=held_out, eval_every=eval_every, progress=False,
               callbacks=[fx.callbacks.on("eval_end", record)])
    except (ValueError, TypeError, NotImplementedError) as e:
        return dataclasses.replace(cell, refused=str(e).splitlines()[0])
    return dataclasses.replace(cell, curve=tuple(curve), seconds=time.perf_counter() - start)


def worst(cell: Cell, reference: Cell) -> float:
    """The largest relative distance of ``cell``'s curve from ``reference``'s (inf where a
    point is not finite or a point is missing)."""
    if len(cell.curve) != len(reference.curve):
        return math.inf
    distances = [abs(a - b) / abs(b) if math.isfinite(a) else math.inf
                 for (_, a), (_, b) in zip(cell.curve, reference.curve)]
    return max(distances, default=math.inf)


def matrix(models, policies, paths, steps: int, eval_every: int, reference_path=None,
           plant: str | None = None, eval_examples: int = 256) -> list[tuple[Cell, float]]:
    """Every (model, policy, path) cell beside float32's on the same path (or on
    ``reference_path``: float32 eager and compiled differ by reordering alone, far inside
    every band)."""
    rows = []
    for model in models:
        references = {}
        for compiled, autodiff in paths:
            where = reference_path or (compiled, autodiff)
            if where not in references:
                references[where] = train_cell(model, "32", *where, steps=steps,
                                               eval_every=eval_every, eval_examples=eval_examples)
            reference = references[where]
            for policy in policies:
                cell = reference if policy == "32" and where == (compiled, autodiff) and \
                    plant is None else train_cell(model, policy, compiled, autodiff, steps=steps,
                                                  eval_every=eval_every, plant=plant,
                                                  eval_examples=eval_examples)
                rows.append((cell, math.nan if cell.refused else worst(cell, reference)))
                print(_line(cell, rows[-1][1], steps), flush=True)
    return rows


def _verdict(cell: Cell, distance: float, steps: int) -> str:
    if cell.refused:
        return f"refused: {cell.refused[:90]}"
    return "within" if distance <= band(cell.policy, steps) else "OUTSIDE"


def _line(cell: Cell, distance: float, steps: int) -> str:
    final = f"{cell.curve[-1][1]:.4f}" if cell.curve else "-"
    return (f"{cell.model:<12} {cell.label:<11} {cell.path:<18} final {final:<8} "
            f"worst {distance:8.4f}  band {band(cell.policy, steps):.4f}  "
            f"{_verdict(cell, distance, steps)}  ({cell.seconds:.0f} s)")


def markdown(rows, steps: int) -> str:
    head = ("| model | policy | path | held-out loss at " + " / ".join(
        str(s) for s, _ in next(c for c, _ in rows if c.curve).curve) +
        " | worst distance from float32 | band | verdict |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for cell, distance in rows:
        curve = " / ".join(f"{v:.3f}" for _, v in cell.curve) if cell.curve else "-"
        dist = "-" if cell.refused else f"{distance:.2%}"
        lines.append(f"| {cell.model} | {cell.label} | {cell.path} | {curve} | {dist} | "
                     f"{band(cell.policy, steps):.1%} | {_verdict(cell, distance, steps)} |")
    return head + "\n".join(lines) + "\n"


def _path(parser, path: str) -> tuple[bool, str]:
    mode, _, autodiff = path.partition("/")
    if mode not in ("eager", "compiled") or autodiff not in ("func", "autograd"):
        parser.error(f"a path is eager|compiled/func|autograd, got {path!r}")
    return mode == "compiled", autodiff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"],
                        choices=["mlp", "transformer"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--paths", nargs="+", default=["eager/func", "eager/autograd",
                                                        "compiled/func", "compiled/autograd"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=256,
                        help="the held-out examples each evaluation takes (the first ones)")
    parser.add_argument("--reference", default=None,
                        help="float32's path for every row (default: each row's own)")
    parser.add_argument("--plant", choices=sorted(PLANTS), default=None,
                        help="a bug planted in every cell, which its band must catch")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = [_path(parser, path) for path in args.paths]
    reference = None if args.reference is None else _path(parser, args.reference)
    # as the demo runs (its torch.empty is NaN; Inductor's own buffers are not filled)
    torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bfloat16 {tasks.native_bf16()}")
    rows = matrix(args.models, args.policies, paths, args.steps, args.eval_every, reference,
                  args.plant, args.eval_examples)
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.steps), encoding="utf-8")
    bad = [c for c, d in rows if not c.refused and d > band(c.policy, args.steps)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
