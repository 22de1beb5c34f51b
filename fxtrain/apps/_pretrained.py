"""A checkpoint out to a Hugging Face folder: ``config.json`` and the weights as safetensors,
read and written one tensor at a time.

The checkpoint may be sharded (written by several ranks, ``fx.shard``): each tensor is read
whole from the ranks' files on its own, written, and dropped before the next is read, so the
process never holds more than the largest tensor, whatever the model's size. The safetensors
files are written by hand from the checkpoint's description (every tensor's dtype and shape are
known before a byte is read, so the header comes first), split into files of at most
``max_shard_bytes`` with a ``model.safetensors.index.json`` as ``save_pretrained`` writes them.
The folder is made under a temporary name beside ``directory`` and renamed into place last:
an export that fails leaves nothing behind, and an existing folder is never written into. The
staging folder holds a lock naming its process (``fxtrain.apps._workdir``) while it is written; one
left by an export that was killed is removed, with a warning, by the next export into the same
folder. A ``config`` given is checked against the checkpoint's names and shapes (a transformers
architecture built on the meta device) before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["export_pretrained", "ConfigMismatchError"]

_STAGING_STALE_S = 60.0  # a staging folder without a lock, older than this, is a killed one's


class ConfigMismatchError(ValueError):
    """The config given does not describe the checkpoint's model; nothing was written."""

_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
           "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
           "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_NAME = re.compile(r"\.(params|buffers)\['(.+)'\]")


def export_pretrained(checkpoint: str | os.PathLike, directory: str | os.PathLike, *,
                      step: int | None = None, config: Any = None,
                      max_shard_bytes: int = 5 * 10**9) -> Path:
    """Writes the model of a checkpoint as a Hugging Face folder ``directory``: ``config.json``
    and ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` files and their index),
    which ``AutoModel*.from_pretrained(directory)`` loads. Returns the folder.

    Args:
      checkpoint: a checkpoint, a ``CheckpointManager``'s directory (its latest checkpoint, or
        ``step``'s) or a run's workdir; sharded or not; on a disk, or at a URL in object
        storage (``s3://bucket/run``: downloaded into a temporary folder first).
      directory: the folder to make; it must not exist, or be empty.
      step: which checkpoint of a directory (default: the latest).
      config: the model's config (a transformers ``PretrainedConfig``, a ``config.json`` or a
        folder holding one). Default: the one the checkpoint recorded, which it does when the
        state's model is a transformers model.
      max_shard_bytes: the largest safetensors file (default 5 GB, as ``save_pretrained``'s;
        a tensor larger than it gets a file of its own).

    The parameters and buffers are written under the names the state holds them by (a tied
    weight once, as ``save_pretrained`` writes it); with a recorded model, only the names of its
    ``state_dict`` (no non-persistent buffer). Tensors keep their stored dtype.

    Examples:
        >>> import tempfile, pathlib, transformers
        >>> tmp = pathlib.Path(tempfile.mkdtemp())
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
        ...                                  bos_token_id=0, eos_token_id=0)
        >>> state = fx.TrainState.create(transformers.GPT2LMHeadModel(config), fx.optim.sgd(0.1))
        >>> saved = fx.checkpoint.save(tmp / "ckpt", state)
        >>> out = fx.export_pretrained(tmp / "ckpt", tmp / "hf")
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'model.safetensors']
        >>> model = transformers.GPT2LMHeadModel.from_pretrained(out)
        >>> torch.equal(model.transformer.wte.weight, state.params["transformer.wte.weight"])
        True
        >>> import shutil; shutil.rmtree(tmp)
    """
    from ..checkpoint import inspect, layout, remote, shards, store
    from ..checkpoint.files import fsync_path

    if remote.is_url(checkpoint):
        with remote.local_copy(checkpoint, step) as local:
            return export_pretrained(local, directory, config=config,
                                     max_shard_bytes=max_shard_bytes)

    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes < 1:
        raise ValueError(f"export_pretrained: max_shard_bytes must be a positive int, got "
                         f"{max_shard_bytes!r}")
    target = Path(directory).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"export_pretrained: {target} exists and is not an empty folder; "
                              "nothing was written (choose a new folder)")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"export_pretrained: the folder {target.parent} does not exist")
    path = _chosen(inspect.checkpoint_paths(checkpoint), step)
    meta = layout.read_meta(path)
    config_json = _config(config, meta, path)
    entries = _weights(meta)
    if not entries:
        raise ValueError(f"export_pretrained: the checkpoint {path} holds no parameters")
    adapter = next((e["name"] for e in entries if e["name"].startswith("base_model.model.")
                    and "lora_" in e["name"]), None)  # peft's names, on any layer
    if adapter is not None:
        raise ValueError(f"export_pretrained: the checkpoint {path} holds a peft LoRA model "
                         f"({adapter}); its folder would hold peft's names, which the base "
                         "model cannot load. Write the adapter with fx.save_adapter(state, dir) "
                         "(peft.PeftModel.from_pretrained(base, dir) loads it), or merge it "
                         "with peft's merge_and_unload() on fx.trained_module(state)")
    if config is not None:
        _check_config(config_json, (meta.get("model") or {}).get("config") or {}, entries,
                      config)
    sharded = shards.is_sharded_checkpoint(path)
    if sharded:
        shards.verify_files(path, meta)  # once: each tensor is then read without it
    else:
        layout.check_readable(path)
    saved = store.saved_keys(meta)

    def read(entry: dict) -> torch.Tensor:
        if sharded:
            value = shards.read(path, meta, [entry["key"]], verify=False)[entry["key"]]
        else:
            arrays = store.read_arrays(path, [entry["key"]], saved)
            store.verify_arrays(path, arrays, meta)
            value = arrays[entry["key"]]
        from ..checkpoint.bridge import leaf_value
        return leaf_value(value, entry).contiguous()

    from ._workdir import acquire, release

    _remove_killed_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        lock = acquire(staging, f"fxtrain export {path} {target}")  # whose folder it is
        _write_weights(staging, entries, read, max_shard_bytes, int(meta.get("step") or 0))
        release(lock)
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True)
                                             + "\n", encoding="utf-8")
        for file in staging.iterdir():
            fsync_path(file)
        if target.exists():
            target.rmdir()  # empty: checked above (a file appearing since fails here)
        staging.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _remove_killed_staging(target: Path) -> None:
    """Removes the staging folders of exports into ``target`` that were killed: their lock's
    process is gone (the lock is taken over), or they have no lock and are older than
    ``_STAGING_STALE_S`` (killed before it was written, or by an fxtrain that wrote none). A
    live export's, or one of another host, is left alone."""
    from ._workdir import LOCK_NAME, WorkdirLocked, acquire

    for folder in sorted(target.parent.glob(f".{target.name}.partial-*")):
        if not folder.is_dir():
            continue
        if (folder / LOCK_NAME).exists():
            try:
                with warnings.catch_warnings():  # acquire's takeover warning: said below
                    warnings.simplefilter("ignore")
                    acquire(folder, "fxtrain export (removing a killed export's folder)")
            except WorkdirLocked:
                continue
        elif time.time() - folder.stat().st_mtime < _STAGING_STALE_S:
            continue  # being made now, its lock not written yet
        shutil.rmtree(folder, ignore_errors=True)
        warnings.warn(f"export_pretrained: removed {folder}, the staging folder of an export "
                      f"that was killed before it finished", RuntimeWarning, stacklevel=3)


def _check_config(config_json: dict, recorded: dict, entries: list[dict], given: Any) -> None:
    """Refuses a ``config`` given that does not describe the checkpoint's model (see
    ``_config_problems``), naming the first difference."""
    problems = _config_problems(config_json, recorded, entries)
    if problems:
        source = given if isinstance(given, str | os.PathLike) else type(given).__name__
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ConfigMismatchError(
            f"config {source} does not describe the checkpoint's model ({problems[0]}{more}); "
            "pass the config the model was trained with, or none when the checkpoint recorded "
            "one. Nothing was written.")


def _config_problems(config_json: dict, recorded: dict, entries: list[dict]) -> list[str]:
    """How the model of ``config_json`` (its transformers architecture, else the recorded
    config's when their model types agree, built on the meta device) differs from the
    checkpoint's weights; nothing for a config naming no architecture transformers has (a
    model of one's own)."""
    kind, saved = config_json.get("model_type"), recorded.get("model_type")
    architectures = config_json.get("architectures") or (
        recorded.get("architectures") if kind == saved else None)
    if not architectures and saved is not None and kind != saved:
        return [f"model_type {kind}, the checkpoint's {saved}"]
    model = _meta_model(config_json, architectures or [])
    return [] if model is None else _weight_problems(model.state_dict(keep_vars=True), entries)


def _weight_problems(held: dict[str, torch.Tensor], entries: list[dict]) -> list[str]:
    """The checkpoint's weights missing from a model's ``state_dict`` ``held`` or of another
    shape there, and the model's weights the checkpoint lacks (one of tied names is enough)."""
    problems = []
    for entry in entries:
        name, shape = entry["name"], tuple(entry["shape"])
        if name not in held:
            problems.append(f"{name}: not in the config's model")
        elif tuple(held[name].shape) != shape:
            problems.append(f"{name}: checkpoint {shape}, config {tuple(held[name].shape)}")
    names = {e["name"] for e in entries}
    tied: dict[int, list[str]] = {}
    for name, tensor in held.items():
        tied.setdefault(id(tensor), []).append(name)
    return problems + [f"{group[0]}: in the config's model, not in the checkpoint"
                       for group in tied.values() if not names.intersection(group)]


def _meta_model(config_json: dict, architectures: list[str]) -> Any:
    """The model of the first of ``architectures`` built from ``config_json`` on the meta
    device; None when transformers is missing or has no such model."""
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, architectures[0], None) if architectures else None
    config_class = getattr(cls, "config_class", None)
    if not isinstance(cls, type) or config_class is None:
        return None
    with torch.device("meta"):
        return cls(config_class.from_dict(config_json))


def _chosen(paths: list[Path], step: int | None) -> Path:
    if step is None:
        return paths[-1]
    found = [p for p in paths if p.name == str(step)]
    if not found:
        raise FileNotFoundError(f"export_pretrained: no checkpoint of step {step}; steps: "
                                f"{[p.name for p in paths]}")
    return found[0]


def _config(config: Any, meta: dict, path: Path) -> dict:
    """The ``config.json`` to write: ``config`` as given, else the checkpoint's record."""
    if config is None:
        recorded = (meta.get("model") or {}).get("config")
        if recorded is None:
            raise ValueError(
                f"export_pretrained: the checkpoint {path} records no Hugging Face config (its "
                "model is not a transformers model, or it was saved before fxtrain recorded "
                "one); pass config=... (the model's config, or a folder holding config.json)")
        return recorded
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string(use_diff=False))
    file = Path(config)
    file = file / "config.json" if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"export_pretrained: no config at {file}")
    return json.loads(file.read_text(encoding="utf-8"))


def _weights(meta: dict) -> list[dict]:
    """The entries of the parameters and buffers to write, ``name`` added, sorted by name."""
    keys = (meta.get("model") or {}).get("keys")
    out = []
    for entry in meta["leaves"]:
        match = _NAME.fullmatch(entry["path"])
        if match is None or entry["kind"] != "tensor" or "key" not in entry:
            continue
        name = match.group(2)
        if keys is not None and name not in keys:
            continue  # a buffer the model does not save (non-persistent)
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"export_pretrained: safetensors has no dtype for {name} "
                             f"({entry['dtype']})")
        out.append({**entry, "name": name})
    return sorted(out, key=lambda e: e["name"])


def _nbytes(entry: dict) -> int:
    count = 1
    for n in entry["shape"]:
        count *= n
    return count * torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()


def _files(entries: list[dict], limit: int) -> list[list[dict]]:
    """The entries split in order into files of at most ``limit`` bytes each (a larger tensor
    alone in its file)."""
    files: list[list[dict]] = [[]]
    size = 0
    for entry in entries:
        if files[-1] and size + _nbytes(entry) > limit:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += _nbytes(entry)
    return files


def _write_weights(folder: Path, entries: list[dict], read, limit: int, step: int) -> None:
    files = _files(entries, limit)
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name, group in zip(names, files, strict=True):
        _write_file(folder / name, group, read, {"format": "pt", "fxtrain_step": str(step)})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                 "weight_map": {e["name"]: name for name, group in zip(names, files)
                                for e in group}}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_file(file: Path, entries: list[dict], read, metadata: dict) -> None:
    """One safetensors file: an 8-byte little-endian header size, the JSON header (every
    tensor's dtype, shape and byte range), then the tensors' bytes in that order, each read
    when its turn comes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        size = _nbytes(entry)
        header[entry["name"]] = {"dtype": _DTYPES[entry["dtype"]], "shape": entry["shape"],
                                 "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            f.write(memoryview(_bytes(read(entry))))


def _bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bytes, little-endian as safetensors stores them (x86 and ARM are)."""
    return tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""

