"""What a checkpoint records of the model its state trains, beside the state: for a transformers
model, its config and the names its ``state_dict`` holds, so that ``fxtrain export`` can write a
Hugging Face folder from the checkpoint alone (the model's code is transformers', the weights
are the checkpoint's)."""

from __future__ import annotations

import json
import sys
from typing import Any


def describe(state: Any) -> dict | None:
    """``{"config": ..., "keys": [...]}`` for a state whose module is a transformers
    ``PreTrainedModel`` (its config as ``config.json`` holds it, with its class among the
    ``architectures``; the persistent names of its ``state_dict``), else None."""
    module = getattr(getattr(state, "layout", None), "skeleton", None)  # as made, not sharded
    module = getattr(state, "module", None) if module is None else module
    transformers = sys.modules.get("transformers")  # a model of theirs: imported already
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return None
    config = json.loads(module.config.to_json_string(use_diff=False))
    config["architectures"] = [type(module).__name__]
    return {"config": config, "keys": list(module.state_dict(keep_vars=True))}
