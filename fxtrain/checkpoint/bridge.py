"""The bridge between a state pytree and what orbax stores: numpy arrays plus JSON metadata.

``encode(state)`` flattens the state in torch pytree order into ``{key: np.ndarray}`` (zero-copy
views of contiguous CPU tensors; bfloat16 and float8 through an integer view and ``ml_dtypes``)
and a JSON-able description of every leaf: its path, kind, dtype and shape. Zero-size tensors and
Python numbers and strings live in the JSON only. ``plan`` matches a checkpoint's leaves with a
template's and lists every difference before anything is read; ``decode`` builds the new state
on the template's devices. Nothing here imports orbax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..donation import check_live
from ..distributed import is_dtensor, is_sharded
from ..tree import path_str
from .layout import FORMAT, FORMATS, python_leaf

# torch dtypes numpy lacks: stored as an integer view, typed with ml_dtypes on disk
_VIEWED = {torch.bfloat16: (torch.int16, np.int16, "bfloat16"),
           torch.float8_e4m3fn: (torch.uint8, np.uint8, "float8_e4m3fn"),
           torch.float8_e5m2: (torch.uint8, np.uint8, "float8_e5m2")}
_PYTHON = (bool, int, float, str, type(None))


class CheckpointMismatchError(ValueError):
    """The checkpoint and the template differ; the message lists every differing path."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a leaf entry names (``"float32"``); a ValueError for an unknown one."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in the checkpoint")
    return dtype


def _tensor_array(t: torch.Tensor, path: str) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().resolve_conj().resolve_neg()
    if t.dtype in _VIEWED:
        import ml_dtypes
        as_int, _, name = _VIEWED[t.dtype]
        return t.view(as_int).numpy().view(getattr(ml_dtypes, name))
    try:
        return t.numpy()
    except TypeError as e:
        raise TypeError(f"cannot checkpoint {path}: numpy has no dtype for {t.dtype}") from e


def _python_value(x: Any) -> dict[str, Any]:
    # floats as hex: exact, and NaN and inf stay valid JSON
    return {"type": type(x).__name__, "value": x.hex() if type(x) is float else x}


def _entry(path: str, key: str, leaf: Any) -> tuple[dict[str, Any], Any]:
    """The JSON description of one leaf, and the value to store for it: the tensor itself
    (a DTensor stays one), a C-contiguous numpy array, or None (JSON only)."""
    if isinstance(leaf, torch.Tensor):
        entry = {"path": path, "kind": "tensor", "dtype": _dtype_name(leaf.dtype),
                 "shape": list(leaf.shape), "device": str(leaf.device)}
        if leaf.numel() == 0:
            return entry, None  # orbax refuses zero-size arrays; the shape says it all
        return {**entry, "key": key}, leaf
    if isinstance(leaf, np.ndarray | np.generic):
        arr = np.asarray(leaf)  # numpy scalars become 0-d arrays
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        entry = {"path": path, "kind": "ndarray", "dtype": arr.dtype.name, "shape": list(arr.shape)}
        if arr.dtype.hasobject:
            raise TypeError(f"cannot checkpoint {path}: numpy object arrays are not supported")
        return (entry, None) if arr.size == 0 else ({**entry, "key": key}, arr)
    if type(leaf) in _PYTHON:
        return {"path": path, "kind": "python", **_python_value(leaf)}, None
    raise TypeError(f"cannot checkpoint {path}: a {type(leaf).__name__} is not a tensor, a numpy "
                    "array, a number or a string")


def callback_names(state: Any) -> list[str]:
    """The names in ``state.callbacks`` (empty for other trees)."""
    return sorted(getattr(state, "callbacks", None) or {})


def table(state: Any) -> tuple[dict[str, Any], dict]:
    """``(values, meta)``: the leaves to store (tensors as they are, numpy arrays), keyed
    ``"00000"``..., and the JSON description of every leaf."""
    check_live(state, "saving a checkpoint")
    values, leaves = {}, []
    for i, (keypath, leaf) in enumerate(pytree.tree_flatten_with_path(state)[0]):
        entry, value = _entry(path_str(keypath), f"{i:05d}", leaf)
        section, callback = _section(keypath)
        entry = {**entry, "section": section, **({"callback": callback} if callback else {})}
        leaves.append(entry)
        if value is not None:
            values[entry["key"]] = value
    meta = {"format": FORMAT, "root": type(state).__name__, "callbacks": callback_names(state),
            "leaves": leaves}
    return values, meta


def encode(state: Any) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)``: ``table`` with the tensors as numpy arrays (what orbax stores)."""
    values, meta = table(state)
    if is_sharded(state):
        raise ValueError("a sharded state (fx.shard) is saved by every rank into a sharded "
                         "checkpoint, not as numpy arrays: use fx.checkpoint.save or a "
                         "CheckpointManager on every rank")
    paths = {e["key"]: e["path"] for e in meta["leaves"] if "key" in e}
    arrays = {k: _tensor_array(v, paths[k]) if isinstance(v, torch.Tensor) else v
              for k, v in values.items()}
    return arrays, meta


WEIGHTS = ("params", "buffers")  # the sections a model is made of


def nonfinite(values: dict[str, Any], meta: dict) -> list[str]:
    """The paths of the model's floating-point leaves (``WEIGHTS``) holding a NaN or an
    infinity, from ``table``'s or ``encode``'s output: numpy arrays are checked on the host;
    tensors (a sharded state's: this rank's shards) in one read."""
    entries = [e for e in meta["leaves"] if e.get("section") in WEIGHTS and "key" in e
               and e["kind"] in ("tensor", "ndarray")]
    found, tensors = [], []
    for e in entries:
        value = values[e["key"]]
        if isinstance(value, torch.Tensor):
            local = value.to_local() if is_dtensor(value) else value
            if local.is_floating_point() or local.is_complex():
                tensors.append((e["path"], torch.isfinite(local).all()))
        elif np.issubdtype(value.dtype, np.inexact) or value.dtype.name in (
                "bfloat16", "float8_e4m3fn", "float8_e5m2"):
            if not np.isfinite(value).all():
                found.append(e["path"])
    if tensors:
        finite = torch.stack([t.to(tensors[0][1].device) for _, t in tensors]).tolist()
        found += [path for (path, _), ok in zip(tensors, finite) if not ok]
    return found


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a template's leaves are filled: each from its checkpoint entry, or (entry None) kept
    from the template; ``dropped``: saved callbacks the template no longer has."""

    spec: Any
    sources: list[tuple[str, Any, dict | None]]  # (path, template leaf, entry or None to keep)
    dropped: list[str]

    @property
    def keys(self) -> list[str]:
        return [e["key"] for _, _, e in self.sources if e is not None and "key" in e]


def _section(keypath: tuple) -> tuple[str, str | None]:
    """The top-level name of a path, and the callback name for paths under ``.callbacks``."""
    if not keypath:
        return "", None
    head = keypath[0]
    name = getattr(head, "name", getattr(head, "key", getattr(head, "idx", "")))
    if name == "callbacks" and len(keypath) > 1:
        return str(name), str(getattr(keypath[1], "key", ""))
    return str(name), None


def _leaf_problem(path: str, leaf: Any, entry: dict, cast: bool) -> str | None:
    kind = entry["kind"]
    if isinstance(leaf, torch.Tensor):
        if kind != "tensor":
            return f"  kind of {path}: checkpoint has a {kind} value, the template a tensor"
        if list(leaf.shape) != entry["shape"]:
            return (f"  shape of {path}: checkpoint {tuple(entry['shape'])}, "
                    f"template {tuple(leaf.shape)}")
        if _dtype_name(leaf.dtype) != entry["dtype"] and not cast:
            return (f"  dtype of {path}: checkpoint {entry['dtype']}, template "
                    f"{_dtype_name(leaf.dtype)} (pass cast=True to convert)")
        return None
    if isinstance(leaf, np.ndarray | np.generic):
        if kind != "ndarray" or list(np.shape(leaf)) != entry["shape"]:
            return f"  {path}: checkpoint has {kind} {entry.get('shape')}, template a numpy array"
        return None
    if kind != "python":
        return f"  kind of {path}: checkpoint has a {kind}, the template a {type(leaf).__name__}"
    return None


def _optional(tree: Any, keypath: tuple) -> bool:
    """Whether the leaf at ``keypath`` is a dataclass field declared with
    ``metadata={"optional_in_checkpoints": True}``, or a field a NamedTuple names in its
    ``_optional_in_checkpoints``: one added after checkpoints were written without it, which
    restore with the template's value."""
    parent = tree
    for key in keypath[:-1]:
        get = getattr(key, "get", None)  # torch's GetAttrKey, MappingKey, SequenceKey
        if get is None:
            return False
        parent = get(parent)
    name = getattr(keypath[-1], "name", None) if keypath else None
    if name is not None and name in getattr(type(parent), "_optional_in_checkpoints", ()):
        return True  # a NamedTuple's field (fx.optim.MultiStepsState.acc_weight)
    if not dataclasses.is_dataclass(parent) or name is None:
        return False
    field = {f.name: f for f in dataclasses.fields(parent)}.get(name)
    return field is not None and field.metadata.get("optional_in_checkpoints", False)


def plan(meta: dict, like: Any, *, only: Sequence[str] | None = None,
         cast: bool = False) -> Plan:
    """Matches the checkpoint's leaves to ``like``'s by path; raises listing every difference.

    ``only`` names top-level fields (``"params"``, ``"buffers"``, ...) to take from the
    checkpoint; the rest come from ``like``. Callbacks in the checkpoint but not in ``like`` are
    dropped; those only in ``like`` keep its (initial) state.
    """
    if meta.get("format") not in FORMATS:
        raise ValueError(f"not an fxtrain checkpoint (format {meta.get('format')!r}, "
                         f"expected one of {', '.join(map(repr, FORMATS))})")
    flat, spec = pytree.tree_flatten_with_path(like)
    saved = {e["path"]: e for e in meta["leaves"]}
    names, ours = set(meta.get("callbacks", [])), set(callback_names(like))
    wanted = None if only is None else set(only)
    dropped, added = sorted(names - ours), sorted(ours - names)
    if wanted is not None and "callbacks" not in wanted:
        dropped = []  # not asked for, so nothing is dropped
    if wanted is not None:
        sections = {_section(keypath)[0] for keypath, _ in flat}
        if isinstance(only, str) or wanted - sections:
            raise ValueError(f"only={only!r}: expected a sequence of the template's top-level "
                             f"fields {sorted(sections)}")
    problems, sources, used = [], [], set()

    def taken(keypath, leaf) -> bool:
        section, callback = _section(keypath)
        if section == "callbacks" and callback is None and leaf is None and (
                names or path_str(keypath) not in saved):
            return False  # a template without callbacks: the saved ones are all dropped
        return (wanted is None or section in wanted) and callback not in added

    for keypath, leaf in flat:
        path = path_str(keypath)
        if not taken(keypath, leaf):
            sources.append((path, leaf, None))
        elif path not in saved:
            if _optional(like, keypath):  # a field newer than the checkpoint: the template's
                sources.append((path, leaf, None))
            else:
                problems.append(f"  missing from the checkpoint: {path}")
        else:
            used.add(path)
            problem = _leaf_problem(path, leaf, saved[path], cast)
            problems += [problem] if problem else []
            sources.append((path, leaf, saved[path]))
    for entry in meta["leaves"]:
        section, callback = entry.get("section"), entry.get("callback")
        if section == "callbacks" and callback is None and entry["kind"] == "python":
            continue  # a checkpoint without callback states: the template's keep their init
        if (entry["path"] not in used and callback not in dropped
                and (wanted is None or section in wanted)):
            problems.append(f"  unexpected in the checkpoint: {entry['path']}")
    if problems:
        hint = ""
        if getattr(like, "data", 0) is None and any(".data." in p for p in problems):
            hint = ("\n(the checkpoint holds a data stream's position, which fit saves; a fresh "
                    "TrainState has none: restore into state.replace(data=batches.init()) to "
                    "resume the stream, or pass only=('params', ...) to take part of it)")
        raise CheckpointMismatchError(
            "the checkpoint does not match the template state:\n" + "\n".join(sorted(problems))
            + hint)
    return Plan(spec, sources, dropped)


def _tensor_from(arr: np.ndarray | torch.Tensor | None, entry: dict,
                 like: torch.Tensor | None) -> torch.Tensor:
    dtype = torch_dtype(entry["dtype"])
    if arr is None:
        t = torch.empty(entry["shape"], dtype=dtype)
    elif isinstance(arr, torch.Tensor):  # read by torch.distributed.checkpoint
        t = arr
    else:
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = arr.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        if dtype in _VIEWED:
            t = torch.from_numpy(arr.view(_VIEWED[dtype][1])).view(dtype)
        else:
            t = torch.from_numpy(arr)
    if list(t.shape) != entry["shape"]:
        raise ValueError(f"{entry['path']}: the stored array has shape {tuple(t.shape)}, its "
                         f"description {tuple(entry['shape'])}; the checkpoint is damaged")
    if like is None:
        return t
    if is_dtensor(like) and not is_dtensor(t):  # a whole tensor for a sharded template
        from torch.distributed.tensor import distribute_tensor
        t = t.to(dtype=like.dtype)  # every rank holds it: each keeps its shard, no traffic
        return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
    return t.to(device=like.device, dtype=like.dtype)


def leaf_value(arr: np.ndarray | None, entry: dict, like: Any = None) -> Any:
    """The leaf an entry stores (``arr``: its array, if it has one), on ``like``'s device and in
    its dtype when given, else as stored (CPU)."""
    if entry["kind"] == "tensor":
        return _tensor_from(arr, entry, like)
    if entry["kind"] == "ndarray":
        return np.zeros(entry["shape"], entry["dtype"]) if arr is None else arr
    return python_leaf(entry)


def decode(p: Plan, load: Callable[[list[str]], dict[str, Any]]) -> Any:
    """The new state: ``load(keys)`` reads the needed arrays (or tensors); the template fills
    the rest."""
    arrays = load(p.keys) if p.keys else {}
    leaves = [leaf if e is None else leaf_value(arrays.get(e.get("key")), e, leaf)
              for _, leaf, e in p.sources]
    return pytree.tree_unflatten(leaves, p.spec)
