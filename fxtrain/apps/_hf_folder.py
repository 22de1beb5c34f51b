"""A Hugging Face model folder read by its headers alone: ``config.json``, the safetensors files
(one, or several and their ``model.safetensors.index.json``) and what each file says it holds,
every fault found before a byte of a tensor is read.

A safetensors file is an 8-byte little-endian header size, a JSON header giving every tensor's
dtype, shape and byte range, then the bytes (``fxtrain.apps._pretrained`` writes them so). A
file cut short shows here, from its size against the largest range its header gives, before
safetensors maps it. With an index, every file it names must be there, every tensor it maps
must be in that file's header, and every tensor a header holds must be in the index: a folder
put together from two saves is refused rather than half read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.layout import damage, damaged
from ._pretrained import _DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size

# safetensors' dtype codes, the exporter's table read the other way
DTYPES = {code: getattr(torch, name) for name, code in _DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the folder: its file, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Folder:
    """The folder's ``config.json`` (as a dict) and its tensors by name."""

    path: Path
    config: dict[str, Any]
    entries: dict[str, Entry]


def read(directory: str | Path) -> Folder:
    """The folder at ``directory``, checked: ``FileNotFoundError`` for a folder, config or
    weights that are not there, ``DamagedCheckpointError`` for a file cut short, a header that
    does not parse, or an index that does not match its files."""
    path = Path(directory).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"fx.from_pretrained: no folder at {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"fx.from_pretrained: {path} has no config.json, so it is not a "
                                "Hugging Face model folder (save_pretrained writes one)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(config_file, e, "config.json") from e
    if not isinstance(config, dict):
        raise damage(config_file, f"it holds a JSON {type(config).__name__}, not an object")
    if (path / SINGLE).is_file():  # before an index, as transformers reads them
        entries = _header(path / SINGLE)
    elif (path / INDEX).is_file():
        entries = _indexed(path)
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise FileNotFoundError(
            f"fx.from_pretrained: {path} has neither {SINGLE} nor {INDEX}"
            + (f" (it has {others[:3]}: only safetensors are read; save with "
               "save_pretrained(safe_serialization=True))" if others else ""))
    return Folder(path, config, entries)


def _indexed(path: Path) -> dict[str, Entry]:
    index_file = path / INDEX
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise damaged(index_file, e, "the index") from e
    entries: dict[str, Entry] = {}
    for file_name in sorted(set(weight_map.values())):
        file = path / file_name
        if not file.is_file():
            listed = sorted(k for k, v in weight_map.items() if v == file_name)
            more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
            raise damage(index_file, f"it maps {listed[0]}{more} to {file_name}, which is "
                                     "not in the folder")
        for name, entry in _header(file).items():
            if weight_map.get(name) != file_name:
                raise damage(file, f"it holds {name}, which the index "
                             + (f"maps to {weight_map[name]}" if name in weight_map else
                                "does not list: the index has no entry for it"))
            entries[name] = entry
    for name, file_name in weight_map.items():
        if name not in entries:
            raise damage(path / file_name, f"the index maps {name} to it, and its header does "
                                           "not hold it")
    return entries


def _header(file: Path) -> dict[str, Entry]:
    """The tensors ``file``'s header describes, each checked against the file's size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(length) if length is not None and length <= min(
                _MAX_HEADER, size - 8) else None
    except OSError as e:
        raise damaged(file, e, "its header") from e
    if length is None:
        raise damage(file, f"it is {size} bytes, shorter than a safetensors header: cut short")
    if raw is None:
        raise damage(file, f"its header says it is {length} bytes, and the file is {size}: "
                           "cut short, or not a safetensors file")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise damage(file, f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise damage(file, "its header is not a JSON object")
    header.pop("__metadata__", None)
    entries, ranges = {}, []
    for name, spec in header.items():
        try:
            dtype, shape = DTYPES[spec["dtype"]], tuple(int(n) for n in spec["shape"])
            first, last = (int(n) for n in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            code = spec.get("dtype") if isinstance(spec, dict) else None
            what = f"the dtype {code!r}, which fxtrain does not read" \
                if code is not None and code not in DTYPES else f"no valid entry ({e!r})"
            raise damage(file, f"its header gives {name} {what}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if last - first != nbytes or first < 0:
            raise damage(file, f"its header gives {name} bytes {first} to {last}, and a "
                               f"{spec['dtype']} tensor of shape {list(shape)} is {nbytes}")
        entries[name] = Entry(name, file, dtype, shape)
        ranges.append((first, last, name))
    for (_, end, before), (first, last, name) in zip(sorted(ranges), sorted(ranges)[1:]):
        if first != end:  # safetensors' own rule: the tensors tile the data, in order
            raise damage(file, f"its header gives {name} bytes {first} to {last}, "
                               f"{'overlapping' if first < end else 'leaving a gap after'} "
                               f"{before}'s (to {end})")
    end = max((last for _, last, _ in ranges), default=0)
    if ranges and min(ranges)[0] != 0:
        raise damage(file, f"its header's first tensor starts at byte {min(ranges)[0]}, not 0")
    if size != 8 + length + end:
        raise damage(file, f"it is {size} bytes, and its header describes "
                           f"{8 + length + end}: " + ("cut short (truncated)" if size <
                                                      8 + length + end else "bytes past its end"))
    return entries
