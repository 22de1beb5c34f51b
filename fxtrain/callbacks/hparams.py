"""``log_hparams``: the run's configuration (and optionally its source code) at train_begin."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tarfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from ..logging.values import markdown_table
from .combinators import rank_zero
from .core import NOTHING, Callback
from ..logging.writer import check_writer

SOURCE_SUFFIXES = frozenset({".py", ".pyi", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json",
                             ".sh", ".md", ".txt", ".ipynb"})
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist", "wandb"})
_MAX_FILE_BYTES = 1 << 20


def flatten_config(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``config`` (a mapping, dataclass or argparse namespace, nested) as ``{"a.b": value}``.

    Numbers, strings and bools stay as they are; 0-d tensors become numbers; anything else
    (lists, None, devices, dtypes) becomes its JSON or ``str`` text.

    Examples:
        >>> import dataclasses
        >>> from fxtrain.callbacks.hparams import flatten_config
        >>> @dataclasses.dataclass
        ... class Model:
        ...     width: int = 256
        ...     layers: tuple = (64, 64)
        ...     device: torch.device = torch.device("cpu")
        >>> flatten_config({"lr": 1e-3, "model": Model(), "seed": torch.tensor(7), "note": None})
        {'lr': 0.001, 'model.width': 256, 'model.layers': '[64, 64]', 'model.device': 'cpu',
         'seed': 7, 'note': 'null'}
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, argparse.Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"log_hparams: config must be a mapping, a dataclass or an argparse "
                        f"Namespace, got {type(config).__name__}")
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or isinstance(value, argparse.Namespace) or (
                dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = value.item()
        else:
            try:
                out[name] = json.dumps(value)
            except TypeError:
                out[name] = str(value)
    return out


def _log_dir(writer: Any) -> Path | None:
    """Where ``writer`` writes: its ``logdir``, its file's folder, or a wrapped writer's."""
    if getattr(writer, "logdir", None) is not None:
        return Path(writer.logdir)
    if isinstance(getattr(writer, "path", None), str | os.PathLike):
        return Path(writer.path).parent
    for inner in (getattr(writer, "writer", None), *getattr(writer, "writers", ())):
        found = inner is not None and _log_dir(inner)
        if found:
            return found
    return None


def _sources(root: Path, suffixes: Collection[str], skip: Path | None) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS
                         and not d.endswith(".egg-info")
                         and (skip is None or (here / d).resolve() != skip))
        for n in sorted(names):
            path = here / n
            if path.suffix in suffixes and path.is_file() and \
                    path.stat().st_size <= _MAX_FILE_BYTES:
                files.append(path)
    return files


def archive_code(code_dir: str | os.PathLike, dest_dir: str | os.PathLike, step: int, *,
                 suffixes: Collection[str] = SOURCE_SUFFIXES) -> Path:
    """Writes ``code-step<step>.tar.gz`` in ``dest_dir`` with the source files under
    ``code_dir`` and returns its path.

    Only files with ``suffixes`` of at most 1 MiB are kept; hidden folders, ``__pycache__``,
    virtual environments, build outputs and ``dest_dir`` itself are skipped. An existing
    archive is never replaced: a second one at the same step gets ``-1``, ``-2``... The
    archive appears complete or not at all (written under a temporary name, then renamed).

    Examples:
        >>> import tarfile, tempfile
        >>> from pathlib import Path
        >>> from fxtrain.callbacks.hparams import archive_code
        >>> with tempfile.TemporaryDirectory() as d:
        ...     code = Path(d, "code")
        ...     (code / "__pycache__").mkdir(parents=True)
        ...     for name in ("train.py", "config.yaml", "data.bin", "__pycache__/train.pyc"):
        ...         _ = (code / name).write_text("...")
        ...     first = archive_code(code, Path(d, "run"), step=100)
        ...     again = archive_code(code, Path(d, "run"), step=100)
        ...     with tarfile.open(first) as tar:
        ...         print(first.name, again.name, sorted(tar.getnames()))
        code-step100.tar.gz code-step100-1.tar.gz ['config.yaml', 'train.py']
    """
    root, dest = Path(code_dir), Path(dest_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"log_hparams: code_dir {root} is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    files = _sources(root, frozenset(suffixes), dest.resolve())
    target = dest / f"code-step{int(step)}.tar.gz"
    n = 0
    while target.exists():
        n += 1
        target = dest / f"code-step{int(step)}-{n}.tar.gz"
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)))
    os.replace(partial, target)
    return target


def log_hparams(writer: Any, config: Any, code_dir: str | os.PathLike | None = None, *,
                archive_dir: str | os.PathLike | None = None,
                name: str = "log_hparams") -> Callback:
    """At train_begin, writes ``config`` as hyperparameters and as a markdown table.

    ``config`` is a mapping, dataclass or argparse namespace (nested ones are flattened to
    ``a.b`` keys). With ``code_dir``, the source files there are archived as
    ``code-step<N>.tar.gz`` in ``archive_dir`` (default: where the writer writes), and the
    archive's name is recorded as the ``code_archive`` hyperparameter. A resumed run writes
    both again, at its own step: its code may have changed. Runs on rank 0 only.

    Examples:
        >>> class Show:
        ...     def write_hparams(self, hparams):
        ...         print(hparams)
        ...     def write_texts(self, step, texts):
        ...         print(texts["config"])
        >>> config = {"lr": 1e-3, "model": {"width": 256}}
        >>> cb = fx.callbacks.log_hparams(Show(), config)
        >>> _ = fx.callbacks.fold([cb], None, fx.Event("train_begin", 0))  # fx.fit sends it
        {'lr': 0.001, 'model.width': 256}
        | key | value |
        |---|---|
        | lr | 0.001 |
        | model.width | 256 |

        With ``code_dir``, the code goes next to the writer's file:

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     os.makedirs(f"{d}/code")
        ...     with open(f"{d}/code/train.py", "w") as f:
        ...         _ = f.write("print('training')")
        ...     writer = fx.logging.JsonlWriter(f"{d}/run/metrics.jsonl")
        ...     cb = fx.callbacks.log_hparams(writer, config, code_dir=f"{d}/code")
        ...     _ = fx.callbacks.fold([cb], None, fx.Event("train_begin", 0))
        ...     writer.close()
        ...     print(sorted(os.listdir(f"{d}/run")))
        ...     print(next(fx.logging.read_jsonl(f"{d}/run/metrics.jsonl"))["values"])
        ['code-step0.tar.gz', 'metrics.jsonl']
        {'lr': 0.001, 'model.width': 256, 'code_archive': 'code-step0.tar.gz'}
    """
    check_writer(writer, "log_hparams", "write_hparams", "write_texts")
    flat = flatten_config(config)  # bad configs fail here, not at train_begin
    if code_dir is not None:
        if not Path(code_dir).is_dir():
            raise FileNotFoundError(f"log_hparams: code_dir {code_dir} is not a directory")
        archive_dir = archive_dir if archive_dir is not None else _log_dir(writer)
        if archive_dir is None:
            raise ValueError(f"log_hparams: cannot tell where {type(writer).__name__} writes; "
                             "pass archive_dir= for the code archive")

    def fn(state, event):
        values = dict(flat)
        if code_dir is not None:
            values["code_archive"] = archive_code(code_dir, archive_dir, event.step).name
        writer.write_hparams(values)
        writer.write_texts(event.step, {"config": markdown_table(values)})
        return state, NOTHING

    return rank_zero(Callback(name, None, fn, kinds=("train_begin",), host=True))
