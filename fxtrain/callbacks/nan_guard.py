"""``nan_guard``: a non-finite loss or gradient never reaches the parameters.

On a step whose loss or gradient norm is NaN or infinite, the update is discarded (params,
buffers and optimizer state go back to their values before the step, through ``Control.skip``)
and counted; with ``action="stop"`` training also stops. The flag is a tensor, so the guard
runs inside the compiled step without a sync; the state the loop holds is never poisoned, so a
checkpoint written afterwards is clean.
"""

from __future__ import annotations

import torch

from .. import struct
from .core import Callback, Control, callback_state, set_callback_state


@struct.dataclass
class NanGuardState:
    """``skipped``: non-finite steps so far; ``flagged``: whether the last step was one."""

    skipped: torch.Tensor
    flagged: torch.Tensor


def _save_veto(guard: NanGuardState) -> tuple[torch.Tensor, str]:
    """``fit`` never checkpoints a state whose last step was non-finite."""
    return guard.flagged, "non-finite"


def _stop_reason(guard: NanGuardState) -> tuple[torch.Tensor, str]:
    """What ``fit`` says when a run stopped while this guard had skipped steps."""
    return guard.skipped > 0, ("a step's loss or gradient norm was not finite (its update was "
                               "discarded); fx.debug.find_nonfinite(train_step, state, batch) "
                               "shows where it first appears")


def is_finite_step(metrics) -> torch.Tensor:
    """Whether the step's ``loss`` (and ``grad_norm``, when reported) are finite.

    Examples:
        >>> from fxtrain.callbacks.nan_guard import is_finite_step
        >>> is_finite_step({"loss": torch.tensor(0.5), "grad_norm": torch.tensor(1.0)})
        tensor(True)
        >>> is_finite_step({"loss": torch.tensor(0.5), "grad_norm": torch.tensor(float("inf"))})
        tensor(False)
    """
    if "loss" not in (metrics or {}):
        raise KeyError(f"nan_guard needs the step's 'loss' metric; available: {sorted(metrics or {})}")
    ok = torch.isfinite(torch.as_tensor(metrics["loss"]))
    if "grad_norm" in metrics:
        ok = ok & torch.isfinite(torch.as_tensor(metrics["grad_norm"]))
    return ok


def nan_guard(action: str = "stop", *, max_skips: int | None = None,
              name: str = "nan_guard") -> Callback:
    """Discards non-finite steps, and stops (``"stop"``) or carries on (``"skip"``).

    Args:
      action: "stop" ends training at the first non-finite step; "skip" skips the update and
        counts it.
      max_skips: with "skip", stop once this many steps were skipped in total.
      name: the key of its state in ``state.callbacks``.

    Examples:
        A batch with a NaN target: its step is skipped, the others train.

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(4, 2)
        >>> good, bad = (x, x.sum(1, keepdim=True)), (x, torch.full((4, 1), float("nan")))
        >>> guard = fx.callbacks.nan_guard("skip")
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), callbacks=[guard])
        >>> train_step = fx.make_train_step(loss_fn, callbacks=[guard])
        >>> state = fx.fit(state, train_step, [good, bad, good], max_epochs=1)
        >>> fx.callbacks.callback_state(state, "nan_guard")
        NanGuardState(skipped=tensor(1), flagged=tensor(False))
        >>> int(state.step), all(bool(p.isfinite().all()) for p in state.params.values())
        (3, True)
    """
    if action not in ("stop", "skip"):
        raise ValueError(f"nan_guard: action must be 'stop' or 'skip', got {action!r}")
    if max_skips is not None and (action != "skip" or max_skips < 1):
        raise ValueError("nan_guard: max_skips needs action='skip' and a value >= 1")

    def init(state):
        device = state.step.device
        return NanGuardState(torch.zeros((), dtype=torch.int64, device=device),
                             torch.zeros((), dtype=torch.bool, device=device))

    def fn(state, event):
        guard = callback_state(state, name)
        bad = ~is_finite_step(event.metrics).to(guard.flagged.device)
        new = NanGuardState(guard.skipped + bad.long(), bad)
        stop = bad if action == "stop" else (
            new.skipped >= max_skips if max_skips is not None else False)
        state = set_callback_state(state, name, new)
        return state, Control(stop=stop, skip=bad)

    return Callback(name=name, init=init, fn=fn, kinds=("step_end",), skips=True,
                    save_veto=_save_veto, stop_reason=_stop_reason)


def flagged(state) -> bool:
    """Whether a ``nan_guard`` in ``state`` flagged the last step (one read of device flags).

    Examples:
        >>> from fxtrain.callbacks.nan_guard import NanGuardState, flagged
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
        ...                              callbacks=[fx.callbacks.nan_guard("skip")])
        >>> flagged(state)
        False
        >>> bad = NanGuardState(skipped=torch.tensor(1), flagged=torch.tensor(True))
        >>> flagged(fx.callbacks.set_callback_state(state, "nan_guard", bad))
        True
    """
    flags = [s.flagged for s in (state.callbacks or {}).values() if isinstance(s, NanGuardState)]
    return bool(torch.stack([f.cpu() for f in flags]).any()) if flags else False
