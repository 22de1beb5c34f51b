"""fxtrain: functional training for PyTorch, in the style of flax, optax, orbax and clu.

The API is what ``fxtrain`` and its public packages list in ``__all__``: ``fx.callbacks``,
``fx.checkpoint``, ``fx.data``, ``fx.debug``, ``fx.distributed``, ``fx.donation``,
``fx.logging``, ``fx.losses``, ``fx.metrics``, ``fx.optim``, ``fx.precision``, ``fx.random``, ``fx.sharding``,
``fx.stats``, ``fx.struct`` and ``fx.tree``. As in optax, the modules behind them
(``fxtrain.loop._fit``, ``fxtrain.checkpoint.store``, ``fxtrain.callbacks.ema``, ...) are not API:
their paths and private names may change between releases; import from the packages.
"""

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

# Each public name and the module it comes from, imported on first use (PEP 562): ``import
# fxtrain`` costs nothing beyond this file, so ``fxtrain --help``, ``--version`` and ``inspect``
# start without torch. The first use of a name that is not a package imports the whole public
# package at once, as an eager ``__init__`` would (a step is built or compiled only after one):
# its modules register pytree node types with torch, and a compiled step guards on the size of
# that registry, so a module imported after the first compile would recompile it. Code that
# imports fxtrain's modules directly, never touching a name here, should call
# ``fxtrain._load_all()`` before it compiles (``fxtrain train`` does).
_PACKAGES = ("callbacks", "checkpoint", "data", "debug", "distributed", "donation", "logging",
             "losses", "metrics", "optim", "precision", "random", "sharding", "stats", "struct",
             "tree")
_NAMES = {
    "Control": "protocol", "Event": "protocol", "DonatedError": "donation",
    "load_safetensors": "export", "save_safetensors": "export", "trained_module": "export",
    "export_pretrained": "apps._pretrained", "from_pretrained": "apps._from_pretrained",
    "save_adapter": "apps._adapter",
    "to_device": "data", "shard": "sharding",
    "TrainState": "state", "tree_digest": "tree", "train": "apps._configured",
    **dict.fromkeys(("evaluate", "fit", "Interrupted", "Preempted", "predict", "lr_find",
                     "LrFind", "find_batch_size", "BatchSizeFind"), "loop"),
    **dict.fromkeys(("make_train_step", "make_eval_step", "StepSpec", "step_spec",
                     "cuda_graphed", "precompiled", "regional", "remat", "compile"), "step"),
}


def _load_all() -> None:
    """Imports every public module (once; then a no-op): see the note above ``_PACKAGES``."""
    if "_loaded" in globals():
        return
    globals()["_loaded"] = True
    for module in (*_PACKAGES, *sorted(set(_NAMES.values()))):
        importlib.import_module(f".{module}", __name__)


def __getattr__(name: str):
    if name in _NAMES:  # (not for a package: ``from . import data`` inside fxtrain asks too)
        _load_all()
    if name in _PACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'fxtrain' has no attribute {name!r}")
    globals()[name] = value  # later uses are plain attribute reads (Dynamo traces them as such)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see: the names, eagerly
    from . import (callbacks, checkpoint, data, debug, distributed, donation, logging,
                   losses, metrics, optim, precision, random, sharding, stats, struct, tree)
    from .donation import DonatedError
    from .loop._evaluation import evaluate
    from .export import load_safetensors, save_safetensors, trained_module
    from .apps._pretrained import export_pretrained
    from .apps._from_pretrained import from_pretrained
    from .apps._adapter import save_adapter
    from .data._feed import to_device
    from .step._graphs import cuda_graphed
    from .step._compile import compile
    from .loop._fit import Interrupted, fit
    from .loop._predict import predict
    from .loop._preemption import Preempted
    from .protocol import Control, Event
    from .step._remat import remat
    from .sharding import shard
    from .state import TrainState
    from .step._steps import make_eval_step, make_train_step
    from .step._spec import StepSpec, step_spec
    from .tree import tree_digest
    from .apps._configured import train
    from .loop._lr_find import LrFind, lr_find
    from .loop._batch_size import BatchSizeFind, find_batch_size
    from .step._precompile import precompiled

__all__ = [
    # the state, the step, the loop
    "TrainState", "make_train_step", "make_eval_step", "StepSpec", "step_spec", "fit", "evaluate",
    "predict", "shard", "remat", "Event", "Control", "Interrupted", "Preempted", "DonatedError",
    "train", "lr_find", "LrFind", "find_batch_size", "BatchSizeFind", "precompiled", "regional",
    "compile",
    # moving data and models in and out
    "to_device", "trained_module", "save_safetensors", "load_safetensors", "export_pretrained",
    "from_pretrained", "save_adapter", "cuda_graphed",
    "tree_digest",
    # the packages
    "callbacks", "checkpoint", "data", "debug", "distributed", "donation", "logging", "losses",
    "metrics", "optim", "precision", "random", "sharding", "stats", "struct", "tree",
]
