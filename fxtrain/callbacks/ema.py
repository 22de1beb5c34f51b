"""``ema``: an exponential moving average of the parameters, kept in the state.

``ema_params <- decay * ema_params + (1 - decay) * params`` after each step (tensor maths, so it
runs inside the compiled step or on the host). ``with_ema_params(state)`` swaps the average in,
for evaluation or export.
"""

from __future__ import annotations

import torch

from . import combinators
from .core import Callback, NOTHING, callback_state, set_callback_state

__all__ = ["ema", "with_ema_params"]


def ema(decay: float = 0.999, *, every: int = 1, name: str = "ema") -> Callback:
    """Keeps ``state.callbacks[name]``: the moving average of the floating-point parameters.

    Args:
      decay: weight of the old average per update, in [0, 1).
      every: update every ``every`` steps.
      name: the key of its state in ``state.callbacks``.

    Example::

        cb = fx.callbacks.ema(0.99)
        eval_metrics = eval_step(fx.callbacks.with_ema_params(state), batch)
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema: decay must be in [0, 1), got {decay}")
    def init(state):
        return {k: v.detach().clone() for k, v in state.params.items() if v.is_floating_point()}

    def fn(state, event):
        avg = callback_state(state, name)
        new = {k: torch.lerp(v, state.params[k].to(v.dtype), 1.0 - decay) for k, v in avg.items()}
        return set_callback_state(state, name, new), NOTHING

    return combinators.every(every, Callback(name, init, fn, kinds=("step_end",)))


def with_ema_params(state, name: str = "ema"):
    """``state`` with the moving-average parameters in place of the trained ones."""
    avg = callback_state(state, name)
    return state.replace(params={**state.params, **avg})
