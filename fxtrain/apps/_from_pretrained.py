"""A Hugging Face model folder loaded straight into a ``TrainState``, sharded or not, each rank
reading from the safetensors files only the slices it holds.

The counterpart of ``fx.export_pretrained``. ``from_pretrained`` + ``TrainState.create`` +
``fx.shard`` builds the model whole in every process before it is split (8 ranks, 8 whole
copies in host memory); here no process holds more than its own shards and one slice:

1. the folder is checked by its headers (``fxtrain.apps._hf_folder``): files, index, sizes;
2. the model is built from its config with its parameters on the meta device and its buffers
   real (``fxtrain._torch.meta_init``), so rotary tables and ties are the model's own;
3. its names, shapes and dtype kinds are checked against the folder's before a byte is read;
4. ``TrainState.create`` and ``fx.shard`` run on that skeleton as they would on the real model
   (a meta tensor is split, not scattered), so units, plans, meshes and their refusals are
   ``fx.shard``'s own, and each parameter is a meta DTensor of this rank's local shape;
5. each rank reads its box of every parameter (``fxtrain.distributed._slices``) with
   safetensors' ``get_slice``, one file open at a time, and wraps it as that DTensor;
6. the optimizer state is made on the shards, the step and key on the device, the callback
   states last.

Every rank takes the same decisions in the same order; a fault any rank meets (a file it
cannot read, a shape it does not expect) is gathered and raised on every rank, and nothing
half-loaded is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _hf_folder
from ._pretrained import ConfigMismatchError, _weight_problems

__all__ = ["from_pretrained"]


def from_pretrained(directory: str | os.PathLike, tx: Any, *, mesh: Any = None,
                    units: Any = None, tp_plan: Any = None, offload: str | None = None,
                    param_dtype: torch.dtype | None = None,
                    reduce_dtype: torch.dtype | None = None,
                    dtype: torch.dtype | str | None = None, model_class: Any = None,
                    lora: Any = None, seed: int = 0,
                    callbacks: Sequence[Callable] = ()) -> Any:
    """A ``TrainState`` of the Hugging Face model in ``directory`` (``config.json`` and
    safetensors files, as ``save_pretrained`` or ``fx.export_pretrained`` write them), laid out
    over the ranks as ``fx.shard`` lays it out, each rank reading only its own slices.

    Under a process group of several ranks the state is sharded (``mesh``: default
    ``fx.sharding.mesh()``; ``units``, ``tp_plan``, ``param_dtype``, ``reduce_dtype`` as
    ``fx.shard`` takes them). Alone, it is the whole model, read one tensor at a time. Either
    way it equals, leaf for leaf, ``fx.shard(fx.TrainState.create(Cls.from_pretrained(
    directory), tx, seed=seed), mesh, ...)``, without a whole copy of the model anywhere.

    Args:
      directory: the model's folder.
      tx: the optimizer, as ``TrainState.create`` takes it.
      mesh: the mesh, as ``fx.shard``'s (default ``fx.sharding.mesh()`` under several ranks).
      units: per-block units, as ``fx.shard``'s.
      tp_plan: a tensor-parallel plan, as ``fx.shard``'s.
      offload: ``"optimizer"``: the optimizer state in host memory, as ``fx.shard``'s.
      param_dtype: the dtype units gather in, as ``fx.shard``'s.
      reduce_dtype: the dtype units reduce-scatter in, as ``fx.shard``'s.
      dtype: the dtype of the floating-point weights; None: as transformers' ``"auto"``, the
        config's ``dtype`` where it gives one, else each file's. Buffers the model computes
        (rotary tables) keep the dtype its ``__init__`` gives them.
      model_class: the transformers class (or its name) to build; default the config's first
        ``architectures``.
      lora: a ``peft.LoraConfig``: the model wrapped by ``peft.get_peft_model``, its base
        weights frozen (sharded as the parameters, with no optimizer state) and read from the
        folder, the adapters trained: ``lora_A`` drawn as peft draws it (Kaiming-uniform, or
        normal with ``init_lora_weights="gaussian"``) from ``seed``, ``lora_B`` zeros, so the
        loaded model starts as the folder's. ``fx.save_adapter`` writes the adapter as peft
        saves it.
      seed: the state's key, as ``TrainState.create``'s.
      callbacks: the callbacks whose states the state starts with, as ``TrainState.create``'s.

    Raises:
      FileNotFoundError: no such folder, no ``config.json``, no safetensors weights.
      DamagedCheckpointError: a file cut short, a header that does not parse, an index that
        does not match its files.
      ConfigMismatchError: the config's model and the files disagree (a tensor missing, extra,
        of another shape or another kind), named.
      ValueError: a LoRA configuration it cannot load (adapters that start from the base's
        values, DoRA, ``modules_to_save``, ``lora_bias``, LoRA on an embedding or a
        convolution), named; a layout's keywords in a process that is alone.
      TypeError: ``lora`` is not a ``peft.LoraConfig``.

    Examples:
        >>> import tempfile, transformers
        >>> folder = tempfile.mkdtemp()
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
        ...                                   intermediate_size=32, num_attention_heads=2)
        >>> transformers.LlamaForCausalLM(config).save_pretrained(folder)
        >>> state = fx.from_pretrained(folder, fx.optim.adamw(1e-4))
        >>> state.params["model.embed_tokens.weight"].shape, int(state.step)
        (torch.Size([32, 16]), 0)
        >>> whole = transformers.LlamaForCausalLM.from_pretrained(folder)
        >>> torch.equal(state.params["lm_head.weight"], whole.lm_head.weight)
        True
        >>> import shutil; shutil.rmtree(folder)
    """
    from .. import distributed
    from ..protocol import init_states
    from ..sharding import shard
    from ..state import TrainState

    folder = _agree(lambda: _hf_folder.read(directory))
    target = _agree(lambda: _dtype(dtype, folder))
    model = _agree(lambda: _skeleton(folder, model_class, target))
    held = model.state_dict(keep_vars=True)
    folder = _agree(lambda: _matched(folder, model, held))
    if lora is not None:
        model = _agree(lambda: _with_lora(model, lora, target))
        held = model.state_dict(keep_vars=True)
    sharded = mesh is not None or distributed.world_size() > 1
    if not sharded and (units is not None or tp_plan is not None or param_dtype is not None
                        or reduce_dtype is not None or offload is not None):
        raise ValueError("fx.from_pretrained: units, tp_plan, param_dtype, reduce_dtype and "
                         "offload lay the model out over several ranks, and this process is "
                         "alone; start it with torchrun and fx.distributed.init(), or leave "
                         "them out")
    state = TrainState.create(model, tx, seed=seed)
    if sharded:
        state = shard(state, mesh, units=units, tp_plan=tp_plan, param_dtype=param_dtype,
                      reduce_dtype=reduce_dtype, offload=offload)
    names = _file_names(state, folder)
    device = _device(state)
    adapters = [k for k in state.params if k not in names] if lora is not None else []
    params = _agree(lambda: _read(folder, {k: v for k, v in state.params.items()
                                           if k not in adapters}, names, device))
    params = {k: params[k] if k in params else _drawn(k, state.params[k], lora, seed, device)
              for k in state.params}
    _agree(lambda: _ties_agree(folder, state, params, names))
    persistent = set(held)
    buffers = state.buffers
    if buffers:
        read = _agree(lambda: _read(folder, {k: v for k, v in buffers.items()
                                             if k in persistent and k in names},
                                    names, device))
        buffers = {**buffers, **read}
    loaded = state.replace(params=params, buffers=buffers,
                           step=torch.zeros((), dtype=torch.int64, device=device),
                           rng=_seed_key(seed, device))
    # offloaded, the optimizer state is made on the host: never whole on the device
    on = distributed.to_host(params) if state.layout.offload else params
    loaded = loaded.replace(opt_state=loaded.init_opt_state(on))
    logging.getLogger("fxtrain").info("fx.from_pretrained: %s from %s, %d tensors",
                                      type(model).__name__, folder.path, len(params))
    return loaded.replace(callbacks=init_states(callbacks, loaded))


def _seed_key(seed: int, device: torch.device) -> torch.Tensor:
    from ..random import seed_key
    return seed_key(seed, device)


def _skeleton(folder: _hf_folder.Folder, model_class: Any,
              dtype: torch.dtype) -> torch.nn.Module:
    """The model of the folder's config, built as transformers' ``from_pretrained`` builds it
    (in ``dtype``, every parameter trainable) with its parameters on the meta device."""
    from .._torch.meta_init import parameters_on_meta
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fx.from_pretrained builds the model with transformers: pip install "
                          "'fxtrain[hf]'") from e
    cls = model_class
    if cls is None:
        names = folder.config.get("architectures") or []
        names = [names] if isinstance(names, str) else names
        if not names:
            raise ValueError(f"fx.from_pretrained: {folder.path / 'config.json'} names no "
                             "architectures; pass model_class=... (a transformers class)")
        cls = names[0]
    if isinstance(cls, str):
        found = getattr(transformers, cls, None)
        if found is None:
            raise ValueError(f"fx.from_pretrained: transformers {transformers.__version__} has "
                             f"no model {cls!r} (the config's architectures); pass "
                             "model_class=... (a transformers class)")
        cls = found
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise TypeError(f"fx.from_pretrained: {cls!r} is not a transformers model class")
    config = config_class.from_pretrained(folder.path)
    with parameters_on_meta(dtype):
        model = cls(config)
    kept = sorted(set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) | (
        set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16
        else set()))
    if kept and dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"fx.from_pretrained: {cls.__name__} keeps {kept} in float32 when "
                         f"loaded in {dtype}, which fx.from_pretrained does not do yet; load it "
                         "with dtype=torch.float32 and train it under a precision policy "
                         "(make_train_step(precision='bf16-mixed'))")
    for p in model.parameters():  # transformers' from_pretrained gives them all trainable
        p.requires_grad_(True)
    return model.eval()  # as transformers' from_pretrained gives it


def _dtype(dtype: Any, folder: _hf_folder.Folder) -> torch.dtype:
    """The floating-point weights' dtype, as transformers' ``"auto"`` chooses it: the one
    given, else the config's, else the first floating-point tensor's in the files."""
    chosen = dtype
    if chosen in (None, "auto"):
        chosen = folder.config.get("dtype") or folder.config.get("torch_dtype")
    if chosen in (None, "auto"):
        chosen = next((e.dtype for e in folder.entries.values() if e.dtype.is_floating_point
                       and e.dtype.itemsize > 1), torch.get_default_dtype())
    if isinstance(chosen, str):
        chosen = getattr(torch, chosen, None)
        if not isinstance(chosen, torch.dtype):
            raise ValueError(f"fx.from_pretrained: dtype {dtype!r} is no torch dtype")
    if chosen not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"fx.from_pretrained: dtype {chosen} is not a dtype to build a model "
                         "in (float32, bfloat16, float16, float64)")
    return chosen


def _matched(folder: _hf_folder.Folder, model: torch.nn.Module,
             held: dict[str, torch.Tensor]) -> _hf_folder.Folder:
    """The folder's tensors under the model's names, as transformers matches them: the
    tensors it ignores on purpose left out (the model's ``_keys_to_ignore_on_load_unexpected``,
    old rotary tables and position ids), and a base model's names given the task model's
    prefix (``h.0...`` for ``transformer.h.0...``) or the reverse; then checked against the
    model (names, shapes, kinds)."""
    import re
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.add(r"(^|\.)position_ids$")
    ignored = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    entries = dict(folder.entries)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        ours = any(n.startswith(prefix + ".") for n in held)
        theirs = any(n.startswith(prefix + ".") for n in entries)
        if ours and not theirs:
            entries = {f"{prefix}.{n}": e for n, e in entries.items()}
        elif theirs and not ours:
            entries = {n[len(prefix) + 1:] if n.startswith(prefix + ".") else n: e
                       for n, e in entries.items()}
    # what the model does not hold and transformers ignores on purpose (only then: a pattern
    # may match a name the model holds)
    entries = {n: e for n, e in entries.items()
               if n in held or ignored is None or ignored.search(n) is None}
    matched = dataclasses.replace(folder, entries=entries)
    _check(matched, held)
    return matched


def _check(folder: _hf_folder.Folder, held: dict[str, torch.Tensor]) -> None:
    """Refuses a folder whose tensors are not the config's model's: names, shapes and kinds
    (floating point against integer or bool)."""
    entries = [{"name": n, "shape": list(e.shape)} for n, e in folder.entries.items()]
    problems = _weight_problems(held, entries)
    for name, tensor in held.items():
        entry = folder.entries.get(name)
        if entry is not None and entry.dtype.is_floating_point != tensor.is_floating_point():
            problems.append(f"{name}: the file's {entry.dtype}, the model's {tensor.dtype}")
    if problems:
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ConfigMismatchError(
            f"fx.from_pretrained: the tensors in {folder.path} are not those of the model its "
            f"config.json builds ({problems[0].replace('checkpoint', 'file')}{more}); a "
            "config of another size, or names of a format transformers converts when it loads "
            "(fx.from_pretrained maps a base model's prefix and the names transformers "
            "ignores, no other conversion); nothing was loaded")


def _file_names(state: Any, folder: _hf_folder.Folder) -> dict[str, str]:
    """The folder's name for each of the state's tensors: its own, else a tied alias's (under
    peft's wrapping, the base model's name: ``_base``)."""
    out = {}
    groups = {n: g for g in (state.layout.tied or ()) for n in g}
    for name in [*state.params, *(state.buffers or {})]:
        for candidate in (name, *groups.get(name, ())):
            if _base(candidate) in folder.entries:
                out[name] = _base(candidate)
                break
    return out


_PEFT_PREFIX = "base_model.model."


def _base(name: str) -> str:
    """The base model's name of a tensor of a peft-wrapped model (``base_model.model.`` and a
    wrapped layer's ``.base_layer`` gone); other names as they are."""
    if not name.startswith(_PEFT_PREFIX):
        return name
    return name[len(_PEFT_PREFIX):].replace(".base_layer.", ".")


_LORA_INITS = (True, "gaussian")


def _with_lora(model: torch.nn.Module, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` (the meta skeleton) wrapped by ``peft.get_peft_model(model, config)``, its
    adapters on the meta device too; a configuration whose adapters depend on the base
    weights' values (PiSSA, OLoRA, LoftQ, ...), or that trains more than adapters, refused."""
    from .._torch.meta_init import parameters_on_meta
    try:
        import peft
    except ImportError as e:
        raise ImportError("fx.from_pretrained(lora=...) wraps the model with peft: pip install "
                          "peft") from e
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"fx.from_pretrained: lora takes a peft.LoraConfig, got "
                        f"{type(config).__name__}")
    problems = []
    if config.init_lora_weights not in _LORA_INITS:
        problems.append(f"init_lora_weights={config.init_lora_weights!r} (its adapters start "
                        "from the base weights' values, or from noise on both sides)")
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True (DoRA's magnitudes are the base weights' norms)")
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save!r} (whole modules trained "
                        "beside the adapters)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} (the base layers' biases trained beside the "
                        "adapters; bias='none' trains the adapters alone)")
    if problems:
        allowed = " or ".join(map(repr, _LORA_INITS))
        raise ValueError(f"fx.from_pretrained(lora=...): {'; '.join(problems)} is not "
                         f"supported yet; init_lora_weights may be {allowed}, with plain "
                         "adapters only")
    with parameters_on_meta(dtype):
        wrapped = peft.get_peft_model(model, config)
    other = next((n for n, p in wrapped.named_parameters() if p.requires_grad and not (
        (".lora_A." in n or ".lora_B." in n) and p.dim() == 2)), None)
    if other is not None:
        raise ValueError(f"fx.from_pretrained(lora=...): the adapter {other} is not a linear "
                         "layer's lora_A or lora_B (LoRA on an embedding or a convolution); "
                         "only LoRA on linear layers is supported yet: leave those modules out "
                         "of target_modules")
    return wrapped


def _drawn(name: str, like: Any, config: Any, seed: int, device: torch.device) -> Any:
    """The initial value of the adapter ``name`` (this rank's part of it, for a DTensor
    ``like``): ``lora_A`` drawn as peft draws it, from a generator of ``seed`` and the name
    (every rank draws the same whole tensor and keeps its box), ``lora_B`` zeros."""
    import hashlib
    import math

    from ..distributed import held_box, is_dtensor
    shape = tuple(like.shape)
    whole = torch.zeros(shape, dtype=torch.float32)
    if ".lora_A." in name:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        if config.init_lora_weights == "gaussian":
            whole.normal_(0.0, 1.0 / shape[0], generator=g)  # the layer's own rank
        else:  # nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(shape[1])
            whole.uniform_(-bound, bound, generator=g)
    elif ".lora_B." not in name:
        raise ValueError(f"fx.from_pretrained: {name} is neither in the folder nor an adapter")
    if not is_dtensor(like):
        return whole.to(device=device, dtype=like.dtype)
    box = held_box(like)
    local = whole[box].to(device=device, dtype=like.dtype).contiguous()
    return _wrapped(local, like)


def _device(state: Any) -> torch.device:
    mesh = state.layout.mesh
    if mesh is None or mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def _read(folder: _hf_folder.Folder, like: dict[str, torch.Tensor], names: dict[str, str],
          device: torch.device) -> dict[str, Any]:
    """This rank's part of each tensor of ``like`` (the skeleton's meta tensors or DTensors,
    or its buffers), in its dtype, read file by file."""
    from safetensors import safe_open
    from ..distributed import held_box, is_dtensor
    from safetensors import SafetensorError

    from ..checkpoint.layout import damaged
    by_file: dict[Path, list[str]] = {}
    for key in like:
        by_file.setdefault(folder.entries[names[key]].file, []).append(key)
    out = {}
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in keys:
                    t = like[key]
                    box = held_box(t) if is_dtensor(t) else None
                    value = _value(f, folder.entries[names[key]].name, box, t, t.dtype)
                    value = value.to(device)
                    out[key] = _wrapped(value, t) if box is not None else value
        except (OSError, SafetensorError) as e:  # the bytes, or the disk: not a bug here
            raise damaged(file, e, "its tensors") from e
    return out


def _ties_agree(folder: _hf_folder.Folder, state: Any, params: dict[str, Any],
                names: dict[str, str]) -> None:
    """Refuses files holding two different tensors under names the config ties (a model
    saved untied, its config saying tied): the one read would silently stand for both. Each
    rank compares its own slices."""
    from safetensors import safe_open
    from ..distributed import held_box, is_dtensor
    for group in state.layout.tied or ():
        key = next((n for n in group if n in params), None)
        present = [n for n in group if n in folder.entries and n != names.get(key)]
        if key is None or not present:
            continue
        t = params[key]
        local = t.to_local() if is_dtensor(t) else t
        box = held_box(t) if is_dtensor(t) else None
        for other in present:
            entry = folder.entries[other]
            with safe_open(str(entry.file), framework="pt", device="cpu") as f:
                value = _value(f, entry.name, box, t, local.dtype)
            if not torch.equal(value.to(local.device), local):
                raise ConfigMismatchError(
                    f"fx.from_pretrained: config.json ties {group} (tie_word_embeddings), and "
                    f"{folder.path} holds different tensors for {names[key]} and {other}: set "
                    "tie_word_embeddings to false in config.json to train them apart; nothing "
                    "was loaded")


def _value(f: Any, name: str, box: tuple[slice, ...] | None, like: Any,
           dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name`` of the open file ``f``, or its ``box``, in ``dtype``."""
    if box is None or not box:
        value = f.get_tensor(name)
    elif any(s.start == s.stop for s in box):
        value = torch.empty([s.stop - s.start for s in box], dtype=dtype)
    else:
        value = f.get_slice(name)[box]
    expected = tuple(like.to_local().shape) if box is not None else tuple(like.shape)
    if tuple(value.shape) != expected:  # the slice arithmetic against torch's own split
        raise RuntimeError(f"{name}: read {tuple(value.shape)}, this rank holds {expected}")
    # safetensors may hand back a view of its mapping of the file: the state owns its memory
    # (a file changed or cut on disk later must not change or break it), copied and cast once
    return torch.empty(expected, dtype=dtype).copy_(value)


def _wrapped(local: torch.Tensor, like: Any) -> Any:
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _agree(run: Callable[[], Any]) -> Any:
    """``run()`` on every rank; an error any rank meets is raised on all of them (the first
    rank's that failed), so none is left waiting in a collective."""
    from .. import distributed
    try:
        result, error = run(), None
    except Exception as e:  # any: a rank that raised alone would leave the others waiting
        result, error = None, e
    if distributed.world_size() > 1:
        errors = distributed.all_gather(_portable(error))
        error = error or next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result


def _portable(error: Exception | None) -> Exception | None:
    """``error`` as the other ranks can receive it: itself where it pickles, else a
    ``RuntimeError`` with its type and message."""
    import pickle
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
