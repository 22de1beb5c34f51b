"""The ``fxtrain`` command line: ``fxtrain demo`` and ``fxtrain inspect DIR``."""

from __future__ import annotations

import argparse
import sys

import torch

from .demo.tasks import MODELS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a model on real data with the standard callbacks",
        description="Trains a small model on data that ships with its dependencies "
                    "(scikit-learn's digits, Python's own docstrings) with the compiled "
                    "functional step and the standard callbacks; writes TensorBoard and JSONL "
                    "logs, checkpoints, figures and a loss curve under --workdir.")
    demo.add_argument("--model", choices=MODELS, default="mlp",
                      help="mlp or cnn: classify digits; charlm: a character language model")
    demo.add_argument("--workdir", help="where everything goes (default runs/demo-<model>)")
    demo.add_argument("--steps", type=int,
                      help="training steps (default: mlp 1500, cnn 1000, charlm 2000)")
    demo.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    demo.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --workdir")
    demo.add_argument("--batch-size", type=int,
                      help="examples per step, per process (default: 64, charlm 128)")
    demo.add_argument("--lr", type=float, help="peak learning rate of the warmup-cosine "
                      "schedule (default: 3e-3, charlm 2e-3)")
    demo.add_argument("--eval-every", type=int, default=100,
                      help="steps between evaluations (default %(default)s)")
    demo.add_argument("--log-every", type=int, default=25,
                      help="steps per logged interval of metrics, learning rate and "
                      "throughput (default %(default)s)")
    demo.add_argument("--checkpoint-every", type=int, default=250,
                      help="steps between periodic checkpoints (default %(default)s)")
    demo.add_argument("--keep-best", type=int, default=2,
                      help="best checkpoints kept besides the latest two (default %(default)s)")
    demo.add_argument("--early-stopping-patience", type=int, default=5,
                      help="evaluations without a lower loss before stopping (default %(default)s)")
    demo.add_argument("--early-stopping-min-delta", type=float, default=0.0,
                      help="the smallest decrease of the loss that counts (default %(default)s)")
    demo.add_argument("--grad-monitor-every", type=int, default=100,
                      help="steps between gradient-norm readings (default %(default)s)")
    demo.add_argument("--media-every", type=int, default=500,
                      help="steps between prediction figures or text samples (default %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    inspect = sub.add_parser("inspect", help="list the checkpoints in a directory")
    inspect.add_argument("directory", help="a CheckpointManager's directory, or one checkpoint")
    inspect.add_argument("--step", type=int, help="show this checkpoint's tree")
    inspect.add_argument("--digest", action="store_true",
                         help="print fx.tree_digest of the restored state")
    return parser


def _inspect(directory: str, step: int | None, digest: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    from .checkpoint import inspect as ins
    console = Console(highlight=False)
    try:
        paths = ins.checkpoint_paths(directory)
    except OSError as e:
        print(f"fxtrain inspect: {e}", file=sys.stderr)
        return 1
    rows = [ins.summary(p) for p in paths]
    table = Table(title=f"checkpoints in {directory}")
    for column in ("step", "metrics", "size", "saved"):
        table.add_column(column, justify="right" if column in ("step", "size") else "left")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        table.add_row(str(r["step"]), metrics or "-", ins.format_size(r["size"]),
                      ins.format_age(r["time"]))
    console.print(table)
    chosen = rows[-1] if step is None else next((r for r in rows if r["step"] == step), None)
    if chosen is None:
        print(f"fxtrain inspect: no checkpoint of step {step}; steps: "
              f"{[r['step'] for r in rows]}", file=sys.stderr)
        return 1
    if step is not None:
        tree = Table(title=f"step {step}: {chosen['path']}")
        for column in ("path", "dtype", "shape / value"):
            tree.add_column(column)
        for row in ins.leaf_rows(chosen["meta"]):
            tree.add_row(*row)
        console.print(tree)
        if chosen["meta"].get("metadata"):
            console.print(f"metadata: {chosen['meta']['metadata']}")
    if digest:
        print(f"digest (step {chosen['step']}): {ins.digest(chosen['path'])}")  # unwrapped
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from . import distributed
        from .demo.job import DemoConfig, main as demo_main
        distributed.init()  # under torchrun: join the job (data parallel); else nothing
        try:
            return demo_main(DemoConfig(
                model=args.model, workdir=args.workdir, steps=args.steps, seed=args.seed,
                resume=args.resume, batch_size=args.batch_size, lr=args.lr,
                eval_every=args.eval_every, log_every=args.log_every,
                checkpoint_every=args.checkpoint_every, keep_best=args.keep_best,
                early_stopping_patience=args.early_stopping_patience,
                early_stopping_min_delta=args.early_stopping_min_delta,
                grad_monitor_every=args.grad_monitor_every, media_every=args.media_every,
                progress=not args.no_progress, compile=not args.no_compile))
        finally:
            if distributed.initialized():
                torch.distributed.destroy_process_group()
    if args.command == "inspect":
        return _inspect(args.directory, args.step, args.digest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
