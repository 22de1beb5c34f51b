"""A peft adapter out of a ``TrainState``: ``fx.save_adapter`` writes what peft's
``save_pretrained`` writes for the state's model (``adapter_model.safetensors``,
``adapter_config.json``), gathering only the adapters: the frozen base, sharded or not, is
never made whole. ``peft.PeftModel.from_pretrained(base, directory)`` loads it."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

__all__ = ["save_adapter"]

_WRITTEN = ("adapter_model.safetensors", "adapter_config.json")


def save_adapter(state: Any, directory: str | os.PathLike) -> Path:
    """Writes ``state``'s trained adapters to ``directory`` as peft saves them, and returns it.

    ``state`` is one of a peft-wrapped model (``fx.from_pretrained(..., lora=...)``, or
    ``TrainState.create(peft.get_peft_model(model, config), tx)``, sharded or not). Its
    trainable parameters (the adapters) are gathered whole; its frozen base is not touched.
    Under several ranks, call it on every rank (the gather is a collective); rank 0 writes.

    Raises:
      TypeError: the state's model is not a peft model.
      FileExistsError: ``directory`` already holds an adapter (nothing is overwritten).
    """
    from .. import distributed
    from ..donation import check_live
    check_live(state, "save_adapter")
    skeleton = state.module if state.layout.skeleton is None else state.layout.skeleton
    if not hasattr(skeleton, "peft_config") or not hasattr(skeleton, "save_pretrained"):
        raise TypeError(f"fx.save_adapter: the state's model is a {type(skeleton).__name__}, "
                        "not a peft model; wrap it with peft.get_peft_model (or load it with "
                        "fx.from_pretrained(..., lora=...)), or save it whole with "
                        "fx.export_pretrained")
    path = Path(directory)
    adapters = distributed.gathered(state.params)  # a collective: every rank, first

    def write() -> Path:
        there = [name for name in _WRITTEN if (path / name).exists()]
        if there:
            raise FileExistsError(f"fx.save_adapter: {path} already holds {there}; nothing was "
                                  "written (choose another folder, or remove those files)")
        module = copy.deepcopy(skeleton)  # weightless: the base stays on the meta device
        module.load_state_dict({k: v.detach().cpu() for k, v in adapters.items()},
                               strict=False, assign=True)
        module.save_pretrained(path)
        return path

    return distributed.rank_zero_then_broadcast(write, "save the adapter")
