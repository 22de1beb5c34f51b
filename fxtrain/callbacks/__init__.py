"""Callbacks: pure functions ``(state, event) -> (state, control)``, and the built-in catalogue.

Callbacks that only do tensor maths (``early_stopping``, ``nan_guard``, ``grad_monitor``, ``ema``,
``swa``, ``loss_spike``, ``reduce_lr_on_plateau``) run inside the compiled step (``make_train_step(callbacks=...)``) or on
the host (``fit(callbacks=...)``); those that do IO or read the clock run on the host only.
The logging callbacks (``log_metrics``, ``log_eval_metrics``, ``log_hparams``, ``model_watch``,
``log_media``, ``text_samples``, ``generation_eval``) write to any ``fx.logging.Writer``, on rank 0 only.
"""

import warnings as _warnings

from .checkpoint_policy import checkpoint_policy as checkpoint_policy
from .combinators import as_callback as as_callback
from .combinators import every as every
from .combinators import every_secs as every_secs
from .combinators import lambda_callback as lambda_callback
from .combinators import on as on
from .combinators import on_steps as on_steps
from .combinators import rank_zero as rank_zero
from .core import DEFAULT_KINDS as DEFAULT_KINDS
from .core import EVENT_KINDS as EVENT_KINDS
from .core import Callback as Callback
from .core import Control as Control
from .core import Event as Event
from .core import StepState as StepState
from .core import callback_state as callback_state
from .core import fold as fold
from .core import init as init
from .core import init_states as init_states
from .core import set_callback_state as set_callback_state
from .early_stopping import early_stopping as early_stopping
from .ema import ema as ema
from .ema import with_ema_params as with_ema_params
from .flops import count_step_flops as count_step_flops
from .flops import device_peak_flops as device_peak_flops
from .generation import generation_eval as generation_eval
from .generation import generation_eval_step as generation_eval_step
from .generation import sample_tokens as sample_tokens
from .grad_monitor import grad_monitor as grad_monitor
from .hf import hf_callback as hf_callback
from .hparams import log_hparams as log_hparams
from .log_metrics import log_eval_metrics as log_eval_metrics
from .log_metrics import log_metrics as log_metrics
from .loss_spike import loss_spike as loss_spike
from .media import log_media as log_media
from .media import text_samples as text_samples
from .memory_snapshot import memory_snapshot as memory_snapshot
from .model_watch import model_watch as model_watch
from .monitors import lr_monitor as lr_monitor
from .monitors import memory_monitor as memory_monitor
from .monitors import throughput as throughput
from .nan_guard import nan_guard as nan_guard
from .plateau import reduce_lr_on_plateau as reduce_lr_on_plateau
from .progress import progress_bar as progress_bar
from .summary import summary as summary
from .swa import swa as swa
from .swa import update_bn as update_bn
from .swa import with_swa_params as with_swa_params
from .system import system_monitor as system_monitor
from .timer import timer as timer

__all__ = [
    # the protocol
    "Callback", "Control", "Event", "EVENT_KINDS", "DEFAULT_KINDS", "StepState", "fold", "init",
    "init_states",
    "callback_state", "set_callback_state",
    # when a callback runs
    "every", "every_secs", "on_steps", "on", "rank_zero", "lambda_callback", "as_callback",
    # the catalogue
    "checkpoint_policy", "early_stopping", "ema", "with_ema_params", "grad_monitor",
    "hf_callback", "log_hparams", "log_eval_metrics", "log_metrics", "log_media",
    "text_samples", "model_watch", "lr_monitor", "memory_monitor", "memory_snapshot",
    "throughput", "nan_guard", "reduce_lr_on_plateau", "progress_bar", "summary", "timer",
    "count_step_flops", "device_peak_flops", "system_monitor",
    "loss_spike", "swa", "with_swa_params", "update_bn",
    "generation_eval", "generation_eval_step", "sample_tokens",
]

# old names, kept for one release: (new home, its name there)
_MOVED = {"checkpoint": ("fxtrain.callbacks", "checkpoint_policy"),
          "explain_step": ("fxtrain.debug", "explain_step"),
          "find_graph_breaks": ("fxtrain.debug", "find_graph_breaks"),
          "profiler": ("fxtrain.debug", "profiler")}


def __getattr__(name: str):
    if name in _MOVED:  # imported by name, late: fx.debug sits above the callbacks
        import importlib

        module, new = _MOVED[name]
        _warnings.warn(f"fx.callbacks.{name} is now {module.replace('fxtrain', 'fx')}.{new} "
                       "(the old name is deprecated)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
