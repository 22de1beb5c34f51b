"""fxtrain: functional training for PyTorch, in the style of flax, optax, orbax and clu.

The API is what ``fxtrain`` and its public packages list in ``__all__``: ``fx.callbacks``,
``fx.checkpoint``, ``fx.data``, ``fx.debug``, ``fx.distributed``, ``fx.donation``,
``fx.logging``, ``fx.metrics``, ``fx.optim``, ``fx.precision``, ``fx.random``, ``fx.sharding``,
``fx.stats``, ``fx.struct`` and ``fx.tree``. As in optax, the modules behind them
(``fxtrain.loop``, ``fxtrain.checkpoint.store``, ``fxtrain.callbacks.ema``, ...) are not API:
their paths and private names may change between releases; import from the packages.
"""

from . import callbacks as callbacks
from . import checkpoint as checkpoint
from . import data as data
from . import debug as debug
from . import distributed as distributed
from . import donation as donation
from . import logging as logging
from . import metrics as metrics
from . import optim as optim
from . import precision as precision
from . import random as random
from . import sharding as sharding
from . import stats as stats
from . import struct as struct
from . import tree as tree
from ._version import __version__ as __version__
from .protocol import Control as Control
from .protocol import Event as Event
from .donation import DonatedError as DonatedError
from .evaluation import evaluate as evaluate
from .export import load_safetensors as load_safetensors
from .export import save_safetensors as save_safetensors
from .export import trained_module as trained_module
from .feed import to_device as to_device
from .graphs import cuda_graphed as cuda_graphed
from .loop import Interrupted as Interrupted
from .loop import fit as fit
from .predict import predict as predict
from .preemption import Preempted as Preempted
from .remat import remat as remat
from .sharding import shard as shard
from .state import TrainState as TrainState
from .step import make_eval_step as make_eval_step
from .step import make_train_step as make_train_step
from .step_spec import StepSpec as StepSpec
from .step_spec import step_spec as step_spec
from .tree import tree_digest as tree_digest

__all__ = [
    # the state, the step, the loop
    "TrainState", "make_train_step", "make_eval_step", "StepSpec", "step_spec", "fit", "evaluate",
    "predict", "shard", "remat", "Event", "Control", "Interrupted", "Preempted", "DonatedError",
    # moving data and models in and out
    "to_device", "trained_module", "save_safetensors", "load_safetensors", "cuda_graphed",
    "tree_digest",
    # the packages
    "callbacks", "checkpoint", "data", "debug", "distributed", "donation", "logging", "metrics",
    "optim", "precision", "random", "sharding", "stats", "struct", "tree",
]
