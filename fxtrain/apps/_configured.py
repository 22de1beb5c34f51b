"""``fxtrain train CONFIG`` and ``fx.train(config)``: a training run of your own model, described by
a YAML or Python config, with overrides on the command line (``--optim.lr 3e-4``).

The config names Python objects by import path: ``package.module:name``, or a file beside the
config, ``./models.py:name``. ``model`` is called with ``model_args`` and must return an
``nn.Module``; ``data`` (and ``eval_data``) with ``data_args`` (``eval_data_args``) and must
return the batches (``fx.data.Batches`` for exact resume, or any iterable). A Python config is a
file that defines ``CONFIG``, a dict of the same keys.

Parsing is jsonargparse's (the library LightningCLI is built on): the arguments come from
``run``'s signature and docstring, so the config, ``--help``, ``--print_config`` and the
overrides always agree, and a typo in a key is an error that lists the valid ones. It was chosen
over hydra/omegaconf because it needs no decorators or config classes of its own: a typed
function is the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ._exits import EXIT_STATUSES

LOSSES = ("cross_entropy", "mse", "causal_lm")
SCHEDULES = ("constant", "warmup_cosine", "linear")


class ConfigError(ValueError):
    """A config that cannot describe a run (a value out of range, a reference that does not
    resolve, a factory that raises or returns the wrong thing, a workdir holding another run, a
    resume with a config the run was not trained with); nothing was changed on disk."""


@dataclasses.dataclass(frozen=True)
class Optim:
    """The optimizer and its learning-rate schedule.

    Args:
        name: an fx.optim optimizer, by optax's name (adamw, adam, sgd, lion, muon, ...).
        lr: the peak learning rate.
        schedule: constant, warmup_cosine (to 1% of lr at the last step) or linear (to 0).
        warmup_steps: linear warm-up from 0 (warmup_cosine and linear).
        weight_decay: for optimizers that take one (None: the optimizer's default).
        clip_norm: clip the gradients' global norm to this first (None: no clipping).
        args: other keyword arguments of the optimizer (b1, momentum, ...).
    """

    name: str = "adamw"
    lr: float = 1e-3
    schedule: str = "warmup_cosine"
    warmup_steps: int = 0
    weight_decay: float | None = None
    clip_norm: float | None = 1.0
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


def run(model: str | None = None, data: str | None = None, loss: str = "cross_entropy", *,
        model_args: dict[str, Any] | None = None, pretrained: str | None = None,
        pretrained_args: dict[str, Any] | None = None,
        data_args: dict[str, Any] | None = None,
        eval_data: str | None = None, eval_data_args: dict[str, Any] | None = None,
        optim: Optim = Optim(), max_steps: int = 1000, max_epochs: int | None = None,
        eval_every: int | None = None, batch_size: int | Literal["auto"] | None = None,
        max_memory_mib: float | None = None, precision: str | int = "32",
        compile: bool | Literal["precompiled"] = True,
        seed: int = 0, workdir: str = "runs/train", log_every: int = 50,
        checkpoint_every: int | None = 500, keep: int = 2,
        callbacks: list[dict[str, Any]] | None = None, resume: bool = False,
        allow_changes: bool | str | list[str] = False,
        progress: bool | None = None) -> Any:
    """Trains model on data and returns the final TrainState (the text is plain: it is
    fxtrain train --help).

    Args:
        model: the model factory's import path (pkg.mod:make_model, ./file.py:Net); or
            pretrained instead.
        data: the training data factory's import path (required).
        loss: cross_entropy or mse on (inputs, targets) batches, causal_lm (a transformers
            model given input_ids and labels), or the import path of a
            loss_fn(state, params, batch).
        model_args: keyword arguments of the model factory.
        pretrained: a Hugging Face model folder (config.json and safetensors) to fine-tune,
            instead of model: loaded by fx.from_pretrained, which under torchrun shards it
            over the ranks (each reading only its slices).
        pretrained_args: fx.from_pretrained's keywords: units, tp_plan, dtype, param_dtype,
            reduce_dtype (dtypes by name: bfloat16), model_class (a transformers class name),
            offload ("optimizer": the optimizer state in host memory).
        data_args: keyword arguments of the data factory.
        eval_data: the evaluation data factory's import path (None: no evaluation); it may
            return a dict of evaluation sets by name (``{"val": batches, "test": batches}``,
            written ``eval/<set>/<metric>``: ``fx.fit``'s eval_data).
        eval_data_args: keyword arguments of the evaluation data factory.
        optim: the optimizer and its schedule.
        max_steps: the step training ends at (counted over resumes).
        max_epochs: stop after this many epochs too (None: max_steps alone).
        eval_every: steps between evaluations (None: at each epoch end).
        batch_size: passed to the data factory as its batch_size argument (None: the
            factory's own, or data_args'); auto: the largest that fits in memory, found by
            fx.find_batch_size on real steps (less 10%), printed before training; a resume
            searches again (on the CPU the search is deterministic; elsewhere pass the size it
            printed to pin it).
        max_memory_mib: for batch_size auto, the memory the state and a step may use, in MiB
            (required on the CPU, where running out of memory ends the process; on a GPU
            the search stops at the first out-of-memory error, or at this cap).
        precision: 32, bf16-mixed, 16-mixed, bf16-true, fp8 or fp8-rowwise (torchao's float8
            linear layers: a GPU of compute capability 8.9 or more, or the CPU); 32
            unquoted too.
        compile: compile the step with torch.compile (fullgraph); precompiled also keeps the
            compiled step in workdir/step.precompiled (fx.precompiled), which a resumed run
            of the same code loads instead of compiling again; false runs it eagerly, which
            starts at once: on a 2-core CPU compiling paid off after about 3,400 steps of a
            2-layer GPT-2 and 13,000 of a small MLP (470 and 3,000 on a warm compile cache;
            docs/getting-started.md).
        seed: torch's generator before the model and data factories run, and the state's key.
        workdir: where logs (TensorBoard, metrics.jsonl), checkpoints and config.yaml go; one
            run at a time (workdir/.fxtrain.lock names the run that holds it).
        log_every: steps between logged metrics, learning rate and throughput.
        checkpoint_every: steps between checkpoints (None: at the end only).
        keep: checkpoints kept.
        callbacks: more host callbacks, each {"name": an fx.callbacks factory, "args": {...}}.
        resume: continue the run in workdir from its latest checkpoint (from step 0 when it
            saved none), with the config it saved in workdir/config.yaml; without resume a
            workdir that holds a run, or other files, is refused.
        allow_changes: what a resume may change from the saved config: true (anything), or
            keys, as a list or comma-separated (optim.lr,max_steps; optim covers optim.*).
            The replaced config.yaml is kept as config.STEP.yaml.
        progress: show a progress bar (None: when in a terminal or a notebook).
    """
    return _run(dict(locals()))[0]


def _run(values: dict[str, Any]) -> tuple[Any, str | None]:
    """``run`` of the config ``values``: the final TrainState, and the line to print when a
    nan_guard stopped the run at a non-finite step (None: it did not). A workdir in object
    storage is worked in through a local mirror (``_remote_workdir``)."""
    if isinstance(values["precision"], int) and not isinstance(values["precision"], bool):
        values = {**values, "precision": str(values["precision"])}  # YAML's 32 is an int
    _check(values)
    from ..checkpoint.remote import is_url

    if not is_url(values["workdir"]):
        return _run_in(values, Path(values["workdir"]), None)
    from ._remote_workdir import mirrored
    from ._workdir import _command_line

    url = str(values["workdir"]).rstrip("/")
    with mirrored(url, _command_line()) as mirror:
        return _run_in(values, mirror.local, mirror)


def _run_in(values: dict[str, Any], root: Path, mirror: Any) -> tuple[Any, str | None]:
    """``_run`` in the local folder ``root``: the workdir, or the mirror of one in object
    storage (``mirror``), whose checkpoints go to its URL."""
    import torch

    from .. import _load_all, distributed
    from . import _saved_config
    from .. import callbacks as cb
    from ..checkpoint import CheckpointManager, CheckpointMismatchError
    from ..logging import JsonlWriter, MultiWriter, TensorBoardWriter
    from ..loop._fit import fit
    from ..step._compile import compile as compile_step
    from ._nonfinite import watch
    from ._remote_workdir import pushed
    from ._workdir import held

    _load_all()  # every pytree type registered before the step compiles (see fxtrain/__init__)
    resume, compile = values["resume"], values["compile"]
    log_every, checkpoint_every = values["log_every"], values["checkpoint_every"]
    saved_in = root / "checkpoints" if mirror is None else f"{mirror.url}/checkpoints"
    shown = root if mirror is None else mirror.url  # what messages name: the workdir
    record = _saved_config.record({**values, "workdir": str(root.resolve()) if mirror is None
                                   else mirror.url})
    # checked, built, restored, then config.yaml and the logs written: a failure before leaves
    # the workdir as it was
    with held(root):
        latest = distributed.rank_zero_then_broadcast(
            lambda: _admitted(root, record, resume, values["allow_changes"], values["keep"],
                              saved_in, mirror),
            "check the workdir")
        state, step, eval_step, batches, evaluation, extra = _parts(values)
        if compile == "precompiled":
            from ..step._precompile import precompiled
            step = precompiled(step, root / "step.precompiled")
        elif compile:  # fx.compile: a bfloat16 step's Inductor options on this CPU
            step = compile_step(step, state)
        if values["batch_size"] == "auto":
            batches = _found_batches(values, state, step)
        writer = MultiWriter([])  # its writers made at setup, after the restore

        def started(state: Any, event: Any) -> None:
            """At fit's setup, after it restored the checkpoint: config.yaml, then the logs."""
            if event.kind != "setup" or writer.writers:
                return
            kept = distributed.rank_zero_then_broadcast(
                lambda: _saved_config.save(root, record, latest or 0), "write config.yaml")
            _say(root if mirror is None else mirror.url, resume, latest, kept)
            writer.writers = (TensorBoardWriter(root / "tensorboard"),
                              JsonlWriter(root / "metrics.jsonl"))

        watcher, nonfinite = watch()  # whether a nan_guard stopped the run, at which metric
        hosts = [started,
                 cb.checkpoint_policy(every=checkpoint_every) if checkpoint_every else None,
                 cb.log_metrics(writer, log_every, eval_prefix=None),
                 cb.lr_monitor(log_every, writer=writer),
                 cb.throughput(log_every, writer=writer),
                 cb.log_eval_metrics(writer) if evaluation is not None else None, *extra,
                 watcher, None if mirror is None else pushed(mirror)]
        checkpoints = CheckpointManager(saved_in, keep_latest=values["keep"])
        try:
            state = fit(state, step, batches, max_steps=values["max_steps"],
                        max_epochs=values["max_epochs"], eval_step=eval_step,
                        eval_data=evaluation, eval_every=values["eval_every"],
                        checkpoint=checkpoints, callbacks=[h for h in hosts if h is not None],
                        resume=resume, progress=values["progress"])
        except CheckpointMismatchError as e:
            if writer.writers:  # past the restore: not a resume that failed
                raise
            raise ConfigError(f"--resume: the checkpoint of step {latest} in "
                              f"{checkpoints.directory} cannot be restored into the model this "
                              f"config builds ({_first_problem(e)}); resume with the config it "
                              f"was trained with ({shown}/{_saved_config.NAME}), or give another "
                              "--workdir. Nothing was changed.") from e
        finally:
            writer.close()
    stop = nonfinite()
    return state, None if stop is None else _nonfinite_line(values, stop, checkpoints)


def _nonfinite_line(values: dict[str, Any], stop: Any, checkpoints: Any) -> str:
    """What ``fxtrain train`` prints when a nan_guard stopped the run: the step and metric,
    the latest checkpoint, ``fx.debug.find_nonfinite`` and the resume with other settings."""
    from ._nonfinite import message

    from ..checkpoint.remote import is_url

    root = values["workdir"]
    config = f"{str(root).rstrip('/')}/config.yaml" if is_url(root) else Path(root) / "config.yaml"
    change = ("--precision 32 --allow_changes precision" if values["precision"] != "32" else
              f"--optim.lr {values['optim'].lr / 10:g} --allow_changes optim.lr")
    latest = checkpoints.latest_step()
    where = "from it" if latest is not None else "from step 0"
    return message("fxtrain train", stop, checkpoints.directory, latest,
                   f"to go on {where} with other settings: fxtrain train "
                   f"{config} --resume true {change}")


def _parts(v: dict[str, Any]) -> tuple:
    """The run's state, train and eval steps, data, evaluation data and extra callbacks, built
    from the config ``v`` (the user's factories run here; nothing is written)."""
    import torch

    from ..state import TrainState
    from ..step._steps import make_eval_step, make_train_step

    torch.manual_seed(v["seed"])
    module = _built(v["model"], v["model_args"], "model") if v["model"] else None
    if module is not None and not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model: {v['model']} returned {type(module).__name__}, not an "
                          "nn.Module")
    if isinstance(v["batch_size"], int):
        v = {**v, "data_args": {**(v["data_args"] or {}), "batch_size": v["batch_size"]}}
    batches = _data(v, "data") if v["batch_size"] != "auto" else None  # found later
    evaluation = _data(v, "eval_data") if v["eval_data"] else None
    loss_fn = _loss(v["loss"])
    from ..precision import policy

    tx = _optimizer(v["optim"], v["max_steps"])
    if module is None:
        state = _pretrained(v, tx)
    else:
        try:  # fp8: torchao's float8 linear layers
            module = policy(v["precision"]).convert(module)
        except (ImportError, RuntimeError, ValueError) as e:  # no torchao, no float8 here
            raise ConfigError(f"precision: {e}") from e
        state = TrainState.create(module, tx, seed=v["seed"])
    step = make_train_step(loss_fn, precision=v["precision"])
    eval_step = make_eval_step(loss_fn) if evaluation is not None else None
    return (state, step, eval_step, batches, evaluation,
            [_callback(spec) for spec in v["callbacks"] or ()])


PRETRAINED_ARGS = ("units", "tp_plan", "dtype", "param_dtype", "reduce_dtype", "model_class",
                   "offload")


def _pretrained(v: dict[str, Any], tx: Any) -> Any:
    """The state of the ``pretrained`` folder (``fx.from_pretrained``), its faults a
    ``ConfigError`` naming the key."""
    import torch

    from ..checkpoint import DamagedCheckpointError
    from ._from_pretrained import from_pretrained

    args = dict(v["pretrained_args"] or {})
    for key in ("dtype", "param_dtype", "reduce_dtype"):
        if isinstance(args.get(key), str) and not (key == "dtype" and args[key] == "auto"):
            dtype = getattr(torch, args[key], None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(f"pretrained_args.{key}: {args[key]!r} is no torch dtype "
                                  "(bfloat16, float16, float32)")
            args[key] = dtype
    try:
        return from_pretrained(v["pretrained"], tx, seed=v["seed"], **args)
    except (FileNotFoundError, DamagedCheckpointError, ValueError, TypeError) as e:
        raise ConfigError(f"pretrained: {e}") from e


def _found_batches(v: dict[str, Any], state: Any, step: Any) -> Any:
    """The training data at the batch size ``fx.find_batch_size`` finds (``batch_size:
    auto``), its search printed."""
    from .. import distributed
    from ..loop._batch_size import NoBatchSizeFits, find_batch_size

    if distributed.world_size() > 1:
        raise ConfigError("batch_size: auto searches one process's memory, and the ranks of a "
                          "job could choose different sizes; search in one process, then pass "
                          "the size it prints")
    cap = v["max_memory_mib"]
    if cap is None and state.step.device.type != "cuda":
        raise ConfigError(f"max_memory_mib: batch_size auto on {state.step.device.type} needs "
                          "a cap (running out of memory there ends the process instead of "
                          "raising an error): give the memory the state and a step may use")

    def make_data(size: int) -> Any:
        return _data({**v, "data_args": {**(v["data_args"] or {}), "batch_size": size}},
                     "data")

    try:
        found = find_batch_size(state, step, make_data,
                                max_bytes=None if cap is None else int(cap * 2**20))
    except NoBatchSizeFits as e:
        raise ConfigError(f"batch_size: auto: {e}"
                          + (f"; or raise max_memory_mib ({cap})" if cap is not None else "")
                          ) from e
    print(f"fxtrain train: batch_size auto: {found.batch_size}\n{found.trace()}", flush=True)
    return found.data()


def _check(v: dict[str, Any]) -> None:
    """Refuses a value no run can use, naming its key, before anything is built or written."""
    if (v["model"] is None) == (v["pretrained"] is None):
        raise ConfigError("model: give the model factory's import path, or pretrained: a Hugging "
                          "Face model folder to fine-tune (one of the two)"
                          if v["model"] is None else
                          "model and pretrained: both given; keep one (pretrained loads the "
                          "folder's own model)")
    if v["data"] is None:
        raise ConfigError("data: required (the training data factory's import path)")
    if v["pretrained"] is None and v["pretrained_args"]:
        raise ConfigError("pretrained_args: given without pretrained")
    if v["pretrained"] is not None:
        if v["model_args"]:
            raise ConfigError("model_args: the model factory's, and this run loads pretrained "
                              "(its arguments: pretrained_args)")
        unknown = sorted(set(v["pretrained_args"] or {}) - set(PRETRAINED_ARGS))
        if unknown:
            raise ConfigError(f"pretrained_args: {unknown[0]!r} is none of "
                              f"{', '.join(PRETRAINED_ARGS)}")
        if v["precision"] in ("fp8", "fp8-rowwise"):
            raise ConfigError(f"precision: {v['precision']} converts the model's linear layers "
                              "before its weights are laid out, and pretrained loads them "
                              "straight into the state; not yet together")
    for key in ("max_steps", "log_every", "keep"):
        if v[key] < 1:
            raise ConfigError(f"{key}: must be at least 1, got {v[key]}")
    for key, unset in (("max_epochs", "no limit"), ("eval_every", "at each epoch end"),
                       ("checkpoint_every", "at the end only")):
        if v[key] is not None and v[key] < 1:
            raise ConfigError(f"{key}: must be at least 1 (or null: {unset}), got {v[key]}")
    if v["batch_size"] not in (None, "auto") and v["batch_size"] < 1:
        raise ConfigError(f"batch_size: must be at least 1, auto or null, got {v['batch_size']}")
    if v["batch_size"] is not None and "batch_size" in (v["data_args"] or {}):
        raise ConfigError("batch_size: given twice (batch_size and data_args.batch_size); "
                          "keep one")
    if v["max_memory_mib"] is not None and not v["max_memory_mib"] > 0:
        raise ConfigError(f"max_memory_mib: must be positive, got {v['max_memory_mib']}")
    if v["max_memory_mib"] is not None and v["batch_size"] != "auto":
        raise ConfigError(f"max_memory_mib: caps batch_size auto's search, and batch_size is "
                          f"{v['batch_size']!r}: set batch_size: auto, or leave max_memory_mib "
                          "out")
    if not str(v["workdir"]).strip():
        raise ConfigError("workdir: is empty; give the folder the run writes to")
    from ..checkpoint.remote import is_url

    if not is_url(v["workdir"]) and Path(v["workdir"]).exists() and \
            not Path(v["workdir"]).is_dir():
        raise ConfigError(f"workdir: {v['workdir']} is a file, not a directory")
    from ..precision import PRECISIONS

    if v["precision"] not in PRECISIONS:
        raise ConfigError(f"precision: {v['precision']!r} is none of {', '.join(PRECISIONS)}")
    _check_optim(v["optim"], v["max_steps"])


def _check_optim(config: Optim, max_steps: int) -> None:
    from .. import optim

    factory = getattr(optim, config.name, None)
    if not callable(factory) or config.name.startswith("_"):
        close = difflib.get_close_matches(config.name, [n for n in dir(optim) if not
                                                        n.startswith("_")], n=3)
        raise ConfigError(f"optim.name: fx.optim has no optimizer {config.name!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {config.schedule!r} is none of "
                          f"{', '.join(SCHEDULES)}")
    if not (math.isfinite(config.lr) and config.lr >= 0):
        raise ConfigError(f"optim.lr: must be a finite number >= 0, got {config.lr}")
    if not 0 <= config.warmup_steps < max_steps:
        raise ConfigError(f"optim.warmup_steps: must be at least 0 and below max_steps "
                          f"({max_steps}), got {config.warmup_steps}")
    if config.weight_decay is not None and not config.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay: must be >= 0 (or null: the optimizer's "
                          f"default), got {config.weight_decay}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        raise ConfigError(f"optim.clip_norm: must be > 0 (or null: no clipping), got "
                          f"{config.clip_norm}")


def _admitted(root: Path, record: dict, resume: bool, allow: Any, keep: int, saved_in: Any,
              mirror: Any = None) -> int | None:
    """Checks the workdir (under its lock) for this run: refuses another run's files, a run
    without resume, and a resume with changes not allowed; the newest checkpoint's step.
    ``mirror``: the workdir is in object storage, and ``root`` its local mirror."""
    from . import _saved_config
    from ..checkpoint import CheckpointManager
    from ._workdir import LOCK_NAME

    latest = CheckpointManager(saved_in, keep_latest=keep).latest_step()
    shown = root if mirror is None else mirror.url  # what messages name: the workdir
    where = f"workdir: {shown}"
    try:
        saved = _saved_config.read(root)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}, so this run cannot be checked against it; give "
                          "another --workdir. Nothing was changed.") from e
    if saved is None and latest is None:
        others = sorted(p.name + "/" * p.is_dir() for p in root.iterdir()
                        if not p.name.startswith(LOCK_NAME)) if mirror is None else \
            mirror.others()
        if others:
            raise ConfigError(f"{where} holds files of something else than a run of fxtrain "
                              f"train ({', '.join(others[:5])}{', ...' * (len(others) > 5)}; "
                              "no config.yaml); give an empty or new --workdir. Nothing was "
                              "changed.")
        return None
    if not resume:
        ran = (f"checkpoints up to step {latest}" if latest is not None else
               "config.yaml and no checkpoint: an attempt stopped before its first save?")
        todo = "continues it" if latest is not None else \
            "starts it again at step 0 with its config.yaml"
        raise ConfigError(f"{where} already holds a run ({ran}); --resume true {todo}, or "
                          "give another --workdir. Nothing was changed.")
    if saved is None:
        if allow is not True:
            raise ConfigError(f"{where} holds checkpoints (up to step {latest}) but no "
                              "config.yaml to check this config against (not a run of "
                              "fxtrain train?); --allow_changes true resumes from them with "
                              "this config, or give another --workdir. Nothing was changed.")
        return latest
    refused = _saved_config.not_allowed(_saved_config.changes(saved, record), allow)
    if refused:
        keys = ",".join(key for key, _, _ in refused)
        raise ConfigError(f"--resume: the run in {shown} was trained with another config: "
                          f"{_saved_config.describe(refused)}; resume with the config in "
                          f"{shown}/{_saved_config.NAME}, or allow the changes with "
                          f"--allow_changes {keys} (config.yaml is then replaced, the old one "
                          "kept). Nothing was changed.")
    return latest


def _first_problem(error: Exception) -> str:
    """The first difference a restore's error lists (a parameter's, if any), and how many
    more."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.startswith("  ")]
    if not lines:
        return " ".join(str(error).split())
    first = next((line for line in lines if ".params[" in line), lines[0])
    return first + (f"; and {len(lines) - 1} more" if len(lines) > 1 else "")


def _say(root: Path | str, resume: bool, latest: int | None, kept: Path | None) -> None:
    """What a resume changed, on rank 0."""
    from .. import distributed

    if kept is not None and distributed.is_rank_zero():
        print(f"fxtrain train: config.yaml replaced by this run's config; the one it replaced "
              f"(which trained {root} to step {latest or 0}) is kept as {kept.name}", flush=True)
    elif resume and latest is None and distributed.is_rank_zero():
        print(f"fxtrain train: --resume: no checkpoint in {root} yet; starting at step 0",
              flush=True)


def resolve(reference: str, where: str) -> Any:
    """The object ``reference`` names: ``pkg.mod:name``, ``pkg.mod.name`` or
    ``path/file.py:name`` (``train`` has made a path beside the config absolute); ``where``
    names the config key in errors.

    Examples:
        >>> from fxtrain.apps._configured import resolve
        >>> resolve("torch.nn:Linear", "model")
        <class 'torch.nn.modules.linear.Linear'>
        >>> resolve("torch.nn.Lineer", "model")
        Traceback (most recent call last):
        ...
        fxtrain.apps._configured.ConfigError: model: torch.nn has no Lineer
    """
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{where}: expected an import path such as pkg.module:name, got "
                          f"{reference!r}")
    path, sep, name = reference.rpartition(":") if ":" in reference else \
        reference.rpartition(".")
    if not sep or not path or not name:
        raise ConfigError(f"{where}: {reference!r} is not an import path (pkg.module:name, or "
                          "file.py:name)")
    if path.endswith(".py"):
        module = _from_file(Path(path), where)
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise ConfigError(f"{where}: cannot import {path} ({e})") from e
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"{where}: {path} has no {name}") from None


def _from_file(path: Path, where: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{where}: no file {path}")
    name = f"fxtrain_config_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"{where}: importing {path} raised {_raised(e)}") from e
    return module


def _built(reference: str, args: dict | None, where: str) -> Any:
    factory = resolve(reference, where)
    try:
        return factory(**(args or {}))
    except Exception as e:  # the user's code: one line naming the key, and where it raised
        raise ConfigError(f"{where}: calling {reference} with {where}_args {args or {}} "
                          f"raised {_raised(e)}") from e


def _data(v: dict[str, Any], key: str) -> Any:
    """The batches the factory of ``key`` (data, eval_data) returns, refused in one line when
    they are not batches (None, a number, a dict of arrays, whose keys fit would iterate); for
    eval_data, a dict of evaluation sets of batches by name."""
    value = _built(v[key], v[f"{key}_args"], key)
    if key == "eval_data" and isinstance(value, Mapping) and value and not all(
            _array(data) for data in value.values()):  # sets, not one set's dict of arrays
        for name, data in value.items():
            if not _batches(data, arrays=False):
                what = "None" if data is None else type(data).__name__
                raise ConfigError(f"eval_data: {v['eval_data']} returned evaluation sets, of "
                                  f"which {name!r} is {what}, not batches: return each set as "
                                  "fx.data.Batches(arrays, batch_size), a (Stateful)DataLoader "
                                  "or an iterable of batches")
        return _sets(v, value)
    if _batches(value):
        return value
    what = "None" if value is None else type(value).__name__
    raise ConfigError(f"{key}: {v[key]} with {key}_args {v[f'{key}_args'] or {}} returned {what}, "
                      "not batches: return fx.data.Batches(arrays, batch_size), a "
                      "(Stateful)DataLoader or an iterable of batches")


def _array(value: Any) -> bool:
    """Whether ``value`` is an array (a tensor, or anything with a shape and a dtype)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _batches(value: Any, arrays: bool = True) -> bool:
    """Whether ``value`` is batches ``fit`` can read (not a dict of arrays, whose keys it would
    iterate; with ``arrays=False`` not an array either: a dict of arrays is no set of sets)."""
    import torch

    from ..data._batches import as_stream

    if isinstance(value, Mapping) or not arrays and isinstance(value, torch.Tensor):
        return False
    try:
        as_stream(value)
        return True
    except TypeError:
        return False


def _sets(v: dict[str, Any], sets: Mapping) -> Mapping:
    """An eval_data factory's evaluation sets, their names refused in one line as ``fit``
    would refuse them."""
    from ..loop._run import check_sets

    try:
        check_sets(sets)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"eval_data: {v['eval_data']} returned evaluation sets: "
                          f"{str(e).removeprefix('fit: ')}") from e
    return sets


def _raised(e: BaseException) -> str:
    """``Type: message (file, line N)``, the line where ``e`` was raised, on one line."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})" if frames else ""
    return " ".join(f"{type(e).__name__}: {e}{at}".split())


def _loss(loss: str) -> Callable:
    import torch.nn.functional as F

    def cross_entropy(state, params, batch):
        x, y = batch
        logits = state.apply(params, x)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}

    def mse(state, params, batch):
        x, y = batch
        return F.mse_loss(state.apply(params, x), y)

    def causal_lm(state, params, batch):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return state.apply(params, input_ids=ids, labels=ids).loss

    named = {"cross_entropy": cross_entropy, "mse": mse, "causal_lm": causal_lm}
    if loss in named:
        return named[loss]
    if ":" not in loss and "." not in loss:
        raise ConfigError(f"loss: {loss!r} is none of {', '.join(LOSSES)} and not an import "
                          "path of a loss_fn(state, params, batch)")
    return resolve(loss, "loss")


def _optimizer(config: Optim, max_steps: int) -> Any:
    from .. import optim

    factory = getattr(optim, config.name, None)
    if not callable(factory) or config.name.startswith("_"):
        raise ConfigError(f"optim.name: fx.optim has no optimizer {config.name!r}")
    warmup = config.warmup_steps  # below max_steps (_check_optim)
    if config.schedule == "constant":
        lr = config.lr if not warmup else optim.warmup_constant_schedule(0.0, config.lr, warmup)
    elif config.schedule == "warmup_cosine":
        lr = optim.warmup_cosine_decay_schedule(0.0, config.lr, warmup_steps=warmup,
                                                decay_steps=max_steps,
                                                end_value=config.lr * 0.01)
    elif config.schedule == "linear":
        lr = optim.join_schedules([optim.linear_schedule(0.0, config.lr, warmup),
                                   optim.linear_schedule(config.lr, 0.0, max_steps - warmup)],
                                  [warmup])
    else:
        raise ConfigError(f"optim.schedule: {config.schedule!r} is none of constant, "
                          "warmup_cosine, linear")
    kwargs = dict(config.args)
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    try:
        tx = factory(lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim: fx.optim.{config.name} refused {kwargs}: {e}") from e
    return tx if config.clip_norm is None else optim.chain(
        optim.clip_by_global_norm(config.clip_norm), tx)


def _callback(spec: dict) -> Any:
    from .. import callbacks

    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"callbacks: each is {{name: ..., args: {{...}}}}, got {spec!r}")
    factory = getattr(callbacks, spec["name"], None)
    if not callable(factory):
        raise ConfigError(f"callbacks: fx.callbacks has no {spec['name']!r}")
    try:
        return factory(**(spec.get("args") or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"callbacks: {spec['name']} with args {spec.get('args') or {}}: "
                          f"{e}") from e


def parser() -> Any:
    """The jsonargparse parser of ``run``'s arguments, with ``CONFIG`` and ``--config``."""
    try:
        from jsonargparse import ActionConfigFile, ArgumentParser
    except ImportError as e:
        raise ImportError("fxtrain train needs jsonargparse: pip install jsonargparse") from e
    p = ArgumentParser(prog="fxtrain train", description=(
        "Trains your own model from a YAML or Python config; any key can be overridden on the "
        "command line (--optim.lr 3e-4, --max_steps 500)."), exit_on_error=False,
        epilog=EXIT_STATUSES.format(what="config"))
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config (or use CONFIG)")
    p.add_function_arguments(run, fail_untyped=True)
    return p


def _as_args(config: str | Path | dict | None, args: Sequence[str]) -> tuple[list[str], Path]:
    """``args`` with the config first: a YAML file as ``--config``, a Python file's ``CONFIG``
    (or a dict) as a YAML string; and the folder file references are relative to."""
    import yaml

    if config is None:
        return list(args), Path.cwd()
    if isinstance(config, dict):
        return ["--config", yaml.safe_dump(config), *args], Path.cwd()
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    if path.suffix == ".py":
        values = getattr(_from_file(path, "config"), "CONFIG", None)
        if not isinstance(values, dict):
            raise ConfigError(f"{path} defines no CONFIG dict")
        return ["--config", yaml.safe_dump(values), *args], path.parent.resolve()
    return ["--config", str(path), *args], path.parent.resolve()


def train(config: str | Path | dict | None = None, args: Sequence[str] = ()) -> Any:
    """What ``fxtrain train CONFIG ARGS`` does, from Python: parse, then ``run``; returns the
    final ``TrainState``. ``config``: a YAML or Python file, or a dict.

    Examples:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.train({"model": "torch.nn:Linear", "model_args": {"in_features": 4,
        ...                   "out_features": 1}, "data": "fxtrain.apps._configured:example_data",
        ...                   "loss": "mse", "max_steps": 20, "compile": False,
        ...                   "workdir": tmp.name + "/run", "progress": False},
        ...                  ["--optim.lr", "0.05"])
        >>> int(state.step)
        20
        >>> tmp.cleanup()
    """
    return run(**_parsed(config, args))


def _parsed(config: str | Path | dict | None, args: Sequence[str]) -> dict[str, Any]:
    """``run``'s arguments from ``config`` and the overrides ``args`` (``ConfigError`` for a
    key that does not exist or a value of the wrong type)."""
    argv, base = _as_args(config, args)
    p = parser()
    try:
        namespace = p.parse_args(argv)
    except Exception as e:  # jsonargparse's message names the key and what it expected
        raise ConfigError(str(e)) from None
    namespace.pop("config", None)
    for key in REFERENCES:  # a file beside the config, wherever the command runs from
        namespace[key] = _anchored(namespace.get(key), base)
    folder = namespace.get("pretrained")  # a folder beside the config, likewise
    if isinstance(folder, str) and not Path(folder).expanduser().is_absolute():
        namespace["pretrained"] = str((base / folder).resolve())
    values = p.instantiate(namespace).as_dict()
    values["optim"] = namespace_optim(values.get("optim"))
    return values


def _trained(config: str | Path | dict | None = None,
             args: Sequence[str] = ()) -> tuple[Any, str | None]:
    """``train``'s run: the final TrainState, and the line to print when a nan_guard stopped it
    at a non-finite step (None: it did not); ``fxtrain train`` then exits with status 3."""
    bound = inspect.signature(run).bind(**_parsed(config, args))  # as run(**values) would
    bound.apply_defaults()
    return _run(dict(bound.arguments))


REFERENCES = ("model", "data", "eval_data", "loss")  # the keys that name Python objects


def _anchored(reference: Any, base: Path) -> Any:
    """A ``file.py:name`` reference relative to ``base`` made absolute (others unchanged)."""
    if not isinstance(reference, str) or ".py:" not in reference:
        return reference
    path, _, name = reference.rpartition(":")
    return reference if Path(path).is_absolute() else f"{(base / path).resolve()}:{name}"


def namespace_optim(value: Any) -> Optim:
    if isinstance(value, Optim):
        return value
    return Optim(**(value or {}))


def example_data(n: int = 64, seed: int = 0) -> Any:
    """A tiny regression set (inputs of 4 features, one target), for the examples."""
    import torch

    from ..data._batches import Batches
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return Batches((x, x.sum(1, keepdim=True)), 16, seed=seed)
