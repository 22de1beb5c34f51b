"""The ``fxtrain`` command line: ``demo``, ``train``, ``inspect`` and ``export``.

It imports nothing heavy at start: ``--help``, ``--version`` and ``inspect`` run without torch
(``inspect`` reads the checkpoints' JSON descriptions), and each command imports what it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .._format import format_scalars
from .._version import __version__
from ._exits import EXIT_STATUSES, NONFINITE_EXIT

DESCRIPTION = """\
Functional training for PyTorch: the state is one value, the step a pure compiled function,
callbacks pure functions of (state, event). fxtrain COMMAND --help says more."""
MODELS = ("mlp", "cnn", "charlm", "transformer")  # fxtrain.apps.demo.tasks.MODELS, without torch

# the demo's numeric flags: a DemoConfig field each, with what it sets
_KNOBS = {
    "eval_every": "steps between evaluations",
    "log_every": "steps per logged interval of metrics, learning rate and throughput",
    "checkpoint_every": "steps between periodic checkpoints",
    "keep_best": "best checkpoints kept besides the latest two",
    "early_stopping_patience": "evaluations without a lower loss before stopping",
    "early_stopping_min_delta": "the smallest decrease of the loss that counts",
    "grad_monitor_every": "steps between gradient-norm readings",
    "media_every": "steps between prediction figures or text samples",
}


def _per_model(flag: str) -> str:
    from .demo.tasks import DEFAULTS

    return ", ".join(f"{model} {values[flag]:g}" for model, values in DEFAULTS.items())


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; the demo's flags (whose defaults come from its tasks, which import torch)
    only when ``command`` is demo."""
    parser = argparse.ArgumentParser(prog="fxtrain", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a model on real data with the standard callbacks",
        description="Trains a small model on data that ships with its dependencies "
                    "(scikit-learn's digits, Python's own docstrings) with the compiled "
                    "functional step and the standard callbacks; writes TensorBoard and JSONL "
                    "logs, checkpoints, figures and a loss curve under --workdir.",
        epilog=EXIT_STATUSES.format(what="flag"))
    if command == "demo":
        _demo_flags(demo)
    sub.add_parser("train", help="train your own model from a YAML or Python config "
                   "(fxtrain train CONFIG --help)")
    inspect = sub.add_parser(
        "inspect", help="list the checkpoints in a directory",
        description="Lists the checkpoints in a directory (a CheckpointManager's, a run's "
                    "workdir, or one checkpoint): step, metrics, size on disk, age and status. "
                    "It reads their JSON descriptions only (no torch, no orbax), unless "
                    "--verify or --digest reads the arrays.")
    inspect.add_argument("directory", help="a CheckpointManager's directory, or one checkpoint "
                                           "(or a URL in object storage: s3://bucket/run)")
    inspect.add_argument("--step", type=int, help="show this checkpoint's tree")
    inspect.add_argument("--digest", action="store_true",
                         help="print fx.tree_digest of the restored state")
    inspect.add_argument("--verify", action="store_true",
                         help="read every checkpoint completely (every array, its checksum)")
    export = sub.add_parser(
        "export", help="write a checkpoint's model as a Hugging Face folder",
        description="Writes the model of a checkpoint (sharded or not) as a Hugging Face "
                    "folder: config.json and safetensors files that from_pretrained loads. "
                    "Tensors are read and written one at a time: no process holds the model.")
    export.add_argument("checkpoint", help="a checkpoint, a CheckpointManager's directory or a "
                        "run's workdir (its latest checkpoint, or --step's)")
    export.add_argument("directory", help="the folder to write (new, or empty)")
    export.add_argument("--step", type=int, help="the checkpoint of this step")
    export.add_argument("--config", help="the model's config.json, or a folder holding one "
                        "(default: the one the checkpoint recorded, for a transformers model)")
    export.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                        help="the largest safetensors file, in GB (default 5)")
    return parser


def _demo_flags(demo: argparse.ArgumentParser) -> None:
    from .demo.job import DemoConfig

    demo.add_argument("--model", choices=MODELS, default=DemoConfig.model,
                      help="mlp or cnn: classify digits; charlm: a character language model; "
                           "transformer: a small GPT of the same text")
    demo.add_argument("--workdir", help="where everything goes (default runs/demo-<model>)")
    demo.add_argument("--steps", type=int, help=f"training steps (default: {_per_model('steps')})")
    demo.add_argument("--seed", type=int, default=DemoConfig.seed, help="(default %(default)s)")
    demo.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --workdir")
    demo.add_argument("--batch-size", type=int,
                      help=f"examples per step, per process (default: {_per_model('batch_size')})")
    demo.add_argument("--lr", type=float, help="peak learning rate of the warmup-cosine "
                      f"schedule (default: {_per_model('lr')})")
    defaults = DemoConfig()
    for name, help in _KNOBS.items():  # each with DemoConfig's default
        value = getattr(defaults, name)
        demo.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                          help=f"{help} (default {value})")
    demo.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"),
                      help="the step's precision policy (default: 32; transformer: bf16-mixed "
                           "where the machine has native bfloat16, else 32)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--no-compile", action="store_true", help="run the steps eagerly")


def _train(args: list[str]) -> int:
    """``fxtrain train CONFIG [overrides]``: a positional CONFIG is the config file, and
    ``--print-config`` is jsonargparse's ``--print_config``."""
    from ..donation import given_up
    from ..loop._fit import Interrupted
    from ._configured import ConfigError, _as_args, _trained, parser
    from ._workdir import WorkdirLocked

    args = ["--print_config" if a == "--print-config" else a for a in args]
    if not args or args[0] in ("-h", "--help"):
        parser().print_help()
        return 0
    config = None if args[0].startswith("-") else args[0]
    rest = args if config is None else args[1:]
    try:
        if "--print_config" in rest:  # print the merged config and stop, as jsonargparse does
            try:
                parser().parse_args(_as_args(config, rest)[0])
            except SystemExit as printed:  # jsonargparse exits once it has printed
                return printed.code or 0
            except Exception as e:  # jsonargparse's message names the key
                raise ConfigError(str(e)) from None
            return 0
        state, nonfinite = _trained(config, rest)
    except (ConfigError, WorkdirLocked) as e:  # one line; nothing was changed on disk
        print(f"fxtrain train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Interrupted as e:  # Ctrl-C: fit saved the state (a first one) and handed it back
        kept = [a for i, a in enumerate(rest)  # a --resume given already: said once, true
                if a != "--resume" and not (i and rest[i - 1] == "--resume")]
        again = shlex.join(["fxtrain", "train", *([config] if config else []), *kept,
                            "--resume", "true"])
        where = ("stopped inside a step; the latest checkpoint is in the workdir's checkpoints/"
                 if given_up(e.state) else
                 f"interrupted at step {int(e.state.step)}, saved in the workdir's checkpoints/")
        print(f"fxtrain train: {where}. Continue with: {again}", file=sys.stderr, flush=True)
        return 130
    if nonfinite is not None:  # nan_guard stopped it: the step, the metric, what to do next
        print(nonfinite, file=sys.stderr, flush=True)
        return NONFINITE_EXIT
    print(f"fxtrain train: done at step {int(state.step)} (the workdir holds config.yaml, "
          "checkpoints/, tensorboard/ and metrics.jsonl)")
    return 0


def _inspect(directory: str, step: int | None, digest: bool, verify: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..checkpoint import DamagedCheckpointError, UnreadableCheckpointError
    from ..checkpoint import inspect as ins
    from ..checkpoint.remote import is_url
    console = Console(highlight=False)
    try:
        if is_url(directory):  # object storage: descriptions and sizes from the store
            rows = ins.remote_summaries(directory, verify)
        else:
            rows = [ins.summary(p, verify) for p in ins.checkpoint_paths(directory)]
    except (OSError, ImportError, ValueError) as e:
        print(f"fxtrain inspect: {e}", file=sys.stderr)
        return 1
    table = Table(title=f"checkpoints in {directory}")
    for column in ("step", "metrics", "size", "saved", "status"):
        table.add_column(column, justify="right" if column in ("step", "size") else "left")
    for r in rows:
        metrics = format_scalars(dict(sorted(r["metrics"].items())), sep=", ")
        status = (f"DAMAGED: {r['damaged']}" if r["damaged"] else
                  f"UNREADABLE: {r['unreadable']}" if r["unreadable"] else
                  "verified" if verify else "ok")
        table.add_row(str(r["step"]), metrics or "-", ins.format_size(r["size"]),
                      ins.format_age(r["time"]), status)
    console.print(table)
    for r in rows:
        if r["damaged"]:
            print(f"fxtrain inspect: {r['path']} is damaged: {r['damaged']}", file=sys.stderr)
        elif r["unreadable"]:
            print(f"fxtrain inspect: {r['path']} cannot be read: {r['unreadable']}",
                  file=sys.stderr)
    chosen = rows[-1] if step is None else next((r for r in rows if r["step"] == step), None)
    if chosen is None:
        print(f"fxtrain inspect: no checkpoint of step {step}; steps: "
              f"{[r['step'] for r in rows]}", file=sys.stderr)
        return 1
    if chosen["damaged"] or chosen["unreadable"]:
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
        if chosen["meta"].get("world_size"):  # a sharded checkpoint (fxtrain.checkpoint.shards)
            console.print(f"sharded: written by {chosen['meta']['world_size']} ranks with "
                          f"{chosen['meta']['storage']}")
    if digest:
        try:
            print(f"digest (step {chosen['step']}): {ins.digest(chosen['path'])}")  # unwrapped
        except (DamagedCheckpointError, UnreadableCheckpointError) as e:
            print(f"fxtrain inspect: {e}", file=sys.stderr)
            return 1
    return 1 if any(r["damaged"] or r["unreadable"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "train":  # its own parser (jsonargparse): everything after it is its
        return _train(argv[argv.index("train") + 1:])
    args = _parser(command).parse_args(argv)
    if args.command == "demo":
        from .. import distributed
        from .demo.job import DemoConfig
        from .demo.job import main as demo_main

        distributed.init()  # under torchrun: join the job (and leave it at exit); else nothing
        given = {k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__}
        return demo_main(DemoConfig(**given, progress=not args.no_progress,
                                    compile=not args.no_compile))
    if args.command == "inspect":
        return _inspect(args.directory, args.step, args.digest, args.verify)
    if args.command == "export":
        return _export(args)
    return 2


def _export(args: argparse.Namespace) -> int:
    import math

    from ._pretrained import ConfigMismatchError, export_pretrained
    size = args.max_shard_size
    if not (math.isfinite(size) and size * 1e9 >= 1):
        print(f"fxtrain export: error: --max-shard-size must be a positive number of GB (0.5 "
              f"for files of at most 500 MB), got {size:g}; nothing was written",
              file=sys.stderr)
        return 2
    try:
        out = export_pretrained(args.checkpoint, args.directory, step=args.step,
                                config=args.config, max_shard_bytes=int(size * 1e9))
    except ConfigMismatchError as e:  # one line, as a bad argument: nothing was written
        print(f"fxtrain export: error: --{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # a damaged or unreadable checkpoint among them
        print(f"fxtrain export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
