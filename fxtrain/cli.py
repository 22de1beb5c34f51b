"""The ``fxtrain`` command line: ``fxtrain demo`` and ``fxtrain inspect DIR``."""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model end to end")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-compile", action="store_true", help="run the step eagerly")
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
        from .demo import run_demo
        distributed.init()  # under torchrun: join the job (data parallel); else nothing
        try:
            return run_demo(steps=args.steps, seed=args.seed, compile=not args.no_compile)
        finally:
            if distributed.initialized():
                torch.distributed.destroy_process_group()
    if args.command == "inspect":
        return _inspect(args.directory, args.step, args.digest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
