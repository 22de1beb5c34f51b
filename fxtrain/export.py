"""The trained model out of a state: a regular ``nn.Module``, and weights as safetensors.

``TrainState.create`` keeps a weightless skeleton of the model (``state.module``) and the one
copy of the weights in the state. ``trained_module(state)`` builds a regular module again: the
skeleton's structure with the state's parameters and buffers, tied weights kept tied (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``), ready for ``generate``, ``save_pretrained``,
``torch.export`` and ONNX. ``save_safetensors`` writes the same weights in the format the
Hugging Face ecosystem loads, and ``load_safetensors`` puts such a file back into a state.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .donation import check_live
from .distributed import gathered


def _weights(state: Any) -> dict[str, torch.Tensor]:
    """Every trained parameter and buffer of ``state`` by name."""
    return gathered({**state.params, **(state.buffers or {})})  # a sharded state's, whole


def trained_module(state: Any) -> nn.Module:
    """A regular ``nn.Module``: ``state.module``'s structure with ``state``'s trained parameters
    and buffers (copies: later steps never change it), tied weights tied, in the training mode
    the model had. Trainable parameters keep ``requires_grad=True``, frozen ones ``False``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> state = fx.TrainState.create(model, fx.optim.sgd(0.1))
        >>> del model  # the state holds the only weights
        >>> grads = {name: torch.ones_like(p) for name, p in state.params.items()}
        >>> state = state.apply_gradients(grads)
        >>> model = fx.trained_module(state).eval()
        >>> type(model).__name__, torch.equal(model[0].weight, state.params["0.weight"])
        ('Sequential', True)
        >>> model(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """
    check_live(state, "trained_module")
    layout = state.layout
    skeleton = state.module if layout.skeleton is None else layout.skeleton  # no units, no plan
    weights = _weights(state)
    memo: dict[int, Any] = {}
    named = itertools.chain(skeleton.named_parameters(remove_duplicate=False),
                            skeleton.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in memo:  # a tied weight: the name its first occurrence filled
            continue
        if name not in weights:
            raise ValueError(f"trained_module: the state has no tensor {name!r} of "
                             f"{type(skeleton).__name__}; was the state made from this model?")
        value = weights[name].detach().clone()
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"trained_module: {name} has shape {tuple(value.shape)} in the "
                             f"state and {tuple(tensor.shape)} in the model")
        memo[id(tensor)] = nn.Parameter(value, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else value
    # copied with the guard's handle, whose copy then removes the copy's guard
    module, guard = copy.deepcopy((skeleton, layout.guard), memo)
    if guard is not None:
        guard.remove()
    return module


def save_safetensors(state: Any, path: str | os.PathLike, *,
                     metadata: dict[str, str] | None = None) -> Path:
    """Writes ``state``'s parameters and buffers (each tied weight once, under the name the
    state gives it) to a ``.safetensors`` file, with ``metadata`` and the step; returns the path.

    The file is written next to its final name and renamed, so an existing file is replaced
    whole or not at all. Load it with ``load_safetensors(path, like=state)``, or into the
    model with ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``
    (``strict=False`` for the tied names the file holds once).

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> path = fx.save_safetensors(state, pathlib.Path(tmp.name) / "model.safetensors")
        >>> path.name
        'model.safetensors'
        >>> from safetensors import safe_open
        >>> with safe_open(str(path), framework="pt") as f:
        ...     print(sorted(f.keys()), f.metadata()["fxtrain_step"])
        ['bias', 'weight'] 0
        >>> tmp.cleanup()
    """
    check_live(state, "save_safetensors")
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_safetensors: the folder {path.parent} does not exist")
    tensors = {k: v.detach().contiguous().cpu() for k, v in _weights(state).items()}
    info = {"format": "pt", "fxtrain_step": str(int(state.step)), **(metadata or {})}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=info)
    partial.replace(path)
    return path


def load_safetensors(path: str | os.PathLike, like: Any) -> Any:
    """``like`` with its parameters and buffers read from a ``.safetensors`` file (on their
    devices, in their dtypes); every name must be there with its shape and dtype, else a
    ValueError lists what differs. The optimizer state, step and the rest are ``like``'s.

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> trained = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), seed=0)
        >>> path = fx.save_safetensors(trained, pathlib.Path(tmp.name) / "model.safetensors")
        >>> fresh = fx.TrainState.create(nn.Linear(2, 1), fx.optim.adamw(1e-3))
        >>> loaded = fx.load_safetensors(path, like=fresh)
        >>> torch.equal(loaded.params["weight"], trained.params["weight"]), int(loaded.step)
        (True, 0)
        >>> fx.load_safetensors(path, like=fx.TrainState.create(nn.Linear(3, 1), fx.optim.sgd(0.1)))
        Traceback (most recent call last):
            ...
        ValueError: load_safetensors: .../model.safetensors does not hold this state's weights;
        weight: (1, 2) F32 in the file, (1, 3) torch.float32 in the state
        >>> tmp.cleanup()
    """
    check_live(like, "load_safetensors")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_safetensors: no file {path}")
    try:
        opened = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own errors name neither the file nor the fix
        raise ValueError(f"load_safetensors: {path} is not a readable safetensors file "
                         f"(truncated or damaged?): {type(e).__name__}: {e}") from e
    with opened as f:
        names = set(f.keys())
        expected = _weights(like)
        missing, unexpected = sorted(expected.keys() - names), sorted(names - expected.keys())
        wrong = [f"{k}: {tuple(f.get_slice(k).get_shape())} {f.get_slice(k).get_dtype()} in the "
                 f"file, {tuple(v.shape)} {v.dtype} in the state" for k, v in expected.items()
                 if k in names and (tuple(f.get_slice(k).get_shape()) != tuple(v.shape)
                                    or _dtype(f.get_slice(k).get_dtype()) != v.dtype)]
        if missing or unexpected or wrong:
            raise ValueError(
                f"load_safetensors: {path} does not hold this state's weights"
                + (f"; missing {missing[:8]}" if missing else "")
                + (f"; not in the state {unexpected[:8]}" if unexpected else "")
                + (f"; {'; '.join(wrong[:8])}" if wrong else ""))
        read = {k: f.get_tensor(k).to(device=v.device) for k, v in expected.items()}
    params = {k: read[k] for k in like.params}
    buffers = None if like.buffers is None else {k: read[k] for k in like.buffers}
    return like.replace(params=params, buffers=buffers)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _dtype(name: str) -> torch.dtype | None:
    return _DTYPES.get(name)
