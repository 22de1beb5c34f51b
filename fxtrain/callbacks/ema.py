"""``ema``: an exponential moving average of the parameters, kept in the state.

``ema_params <- decay * ema_params + (1 - decay) * params`` after each step (tensor maths, so it
runs inside the compiled step or on the host). ``with_ema_params(state)`` swaps the average in,
for evaluation or export.
"""

from __future__ import annotations

import torch

from . import combinators
from .core import Callback, NOTHING, callback_state, set_callback_state


def ema(decay: float = 0.999, *, every: int = 1, name: str = "ema") -> Callback:
    """Keeps ``state.callbacks[name]``: the moving average of the floating-point parameters.

    Args:
      decay: weight of the old average per update, in [0, 1).
      every: update every ``every`` steps.
      name: the key of its state in ``state.callbacks``.

    Examples:
        Inside the step (it does tensor maths only; on the host, pass it to ``fx.fit``):

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(8, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> ema = fx.callbacks.ema(0.5)  # 0.5 to see it move; 0.999 is usual
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), callbacks=[ema])
        >>> train_step = fx.make_train_step(loss_fn, callbacks=[ema])
        >>> before = state.params["weight"].clone()
        >>> state, _ = train_step(state, batch)
        >>> average = fx.callbacks.callback_state(state, "ema")
        >>> torch.allclose(average["weight"], 0.5 * before + 0.5 * state.params["weight"])
        True
        >>> eval_step = fx.make_eval_step(loss_fn)
        >>> eval_step(fx.callbacks.with_ema_params(state), batch)["loss"].shape  # the average
        torch.Size([])
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
    """``state`` with the moving-average parameters in place of the trained ones.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
        ...                              callbacks=[fx.callbacks.ema()])
        >>> average = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
        >>> state = fx.callbacks.set_callback_state(state, "ema", average)
        >>> fx.callbacks.with_ema_params(state).params
        {'weight': tensor([[0., 0.]]), 'bias': tensor([0.])}
        >>> state.params["bias"].abs().sum() > 0  # the trained parameters stay in state
        tensor(True)
    """
    avg = callback_state(state, name)
    return state.replace(params={**state.params, **avg})
