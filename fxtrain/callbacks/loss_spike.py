"""``loss_spike``: flags a step whose loss jumps far above its recent past; logs, skips or stops.

The recent past is the last ``window`` losses that were not spikes, kept in the state as a ring
buffer (a float64 tensor). A step's loss is a spike when the window is full and the loss rises
above the window's mean by more than ``threshold`` standard deviations *and* by more than
``min_rise`` times the mean's magnitude; a non-finite loss is always one. Tensor maths only, so
it runs inside the compiled step without a sync (or on the host, in ``fit``).
"""

from __future__ import annotations

import math

import torch

from .. import struct
from .core import Callback, Control, callback_state, set_callback_state
from .early_stopping import monitored_value

_ACTIONS = ("log", "skip", "stop")


@struct.dataclass
class LossSpikeState:
    """``window``: the last accepted losses (a ring buffer; the next slot is ``seen % size``);
    ``seen``: losses accepted so far; ``spikes``: spikes so far; ``flagged``: whether the last
    step was one."""

    window: torch.Tensor
    seen: torch.Tensor
    spikes: torch.Tensor
    flagged: torch.Tensor


def is_spike(loss: torch.Tensor, spike: LossSpikeState, threshold: float,
             min_rise: float) -> torch.Tensor:
    """Whether ``loss`` is a spike against the window: non-finite, or (once the window is full)
    above ``mean + threshold * std`` and above ``mean + min_rise * |mean|``.

    The standard deviation is the window's population one (``correction=0``).

    Examples:
        >>> from fxtrain.callbacks.loss_spike import LossSpikeState, is_spike
        >>> window = torch.tensor([1.0, 1.1, 0.9, 1.0], dtype=torch.float64)  # mean 1, std 0.07
        >>> s = LossSpikeState(window, torch.tensor(4), torch.tensor(0), torch.tensor(False))
        >>> is_spike(torch.tensor(1.2), s, threshold=3.0, min_rise=0.1)  # 2.8 std above
        tensor(False)
        >>> is_spike(torch.tensor(1.3), s, threshold=3.0, min_rise=0.1)
        tensor(True)
        >>> is_spike(torch.tensor(float("nan")), s, threshold=3.0, min_rise=0.1)
        tensor(True)
    """
    loss = loss.to(spike.window)
    mean = spike.window.mean()
    rise = loss - mean
    full = spike.seen >= spike.window.numel()
    high = (rise > threshold * spike.window.std(correction=0)) & (rise > min_rise * mean.abs())
    return ~torch.isfinite(loss) | (full & high)


def _accept(spike: LossSpikeState, loss: torch.Tensor, keep: torch.Tensor) -> tuple:
    """The window with ``loss`` written into its next slot where ``keep`` holds, and the count."""
    size = spike.window.numel()
    slot = torch.arange(size, device=spike.window.device) == spike.seen % size
    window = torch.where(slot & keep, loss.to(spike.window), spike.window)
    return window, spike.seen + keep.long()


def _check(window: int, threshold: float, min_rise: float, action: str,
           max_skips: int | None) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"loss_spike: window must be an int >= 2, got {window!r}")
    if not (math.isfinite(threshold) and threshold >= 0 and math.isfinite(min_rise)
            and min_rise >= 0):
        raise ValueError(f"loss_spike: threshold and min_rise must be finite and >= 0, got "
                         f"{threshold!r}, {min_rise!r}")
    if action not in _ACTIONS:
        raise ValueError(f"loss_spike: action must be one of {_ACTIONS}, got {action!r}")
    if max_skips is not None and (action != "skip" or max_skips < 1):
        raise ValueError("loss_spike: max_skips needs action='skip' and a value >= 1")


def loss_spike(monitor: str = "loss", *, window: int = 100, threshold: float = 6.0,
               min_rise: float = 0.1, action: str = "log", max_skips: int | None = None,
               name: str = "loss_spike") -> Callback:
    """Watches a step metric for spikes: counts them and logs, skips or stops on them.

    Args:
      monitor: the step metric to watch ("loss"; "grad_norm" works too).
      window: how many recent non-spike values make the reference; nothing is flagged (but a
        non-finite value) until it is full.
      threshold: how many standard deviations above the window's mean make a spike.
      min_rise: and by how much of the mean's magnitude at least (0.1: 10 % above it), so that
        a very smooth loss, whose deviation is tiny, does not flag every small bump.
      action: on a spike, "log" asks the logging callbacks to write (``Control(log=...)``;
        from inside a step ``fit`` reads it with the other flags, every ``sync_every`` steps)
        and changes nothing else; "skip" discards the step's update (params, buffers and
        optimizer state go back to their values before the step, as ``nan_guard`` does);
        "stop" discards it and stops training.
      max_skips: with "skip", stop once this many steps were skipped in total.
      name: the key of its state in ``state.callbacks``.

    Its state (``callback_state(state, name)``) counts the spikes and flags the last step. A
    spike never enters the window, so one bad batch does not widen the reference; a lasting
    jump (a new data mixture, a schedule restart) is then flagged on every step until the loss
    comes back down: with "skip", bound it with ``max_skips``.

    Examples:
        Inside the step (on the host, pass it to ``fx.fit``): four ordinary steps fill the
        window, then a batch with far-off targets spikes and its update is discarded.

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(16, 2)
        >>> good, bad = (x, x.sum(1, keepdim=True)), (x, 100 * x.sum(1, keepdim=True))
        >>> spike = fx.callbacks.loss_spike(window=4, action="skip")
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.05), callbacks=[spike])
        >>> train_step = fx.make_train_step(loss_fn, callbacks=[spike])
        >>> for _ in range(4):
        ...     state, _ = train_step(state, good)
        >>> before = state.params["weight"].clone()
        >>> state, metrics = train_step(state, bad)
        >>> fx.callbacks.callback_state(state, "loss_spike")
        LossSpikeState(window=tensor([...], dtype=torch.float64), seen=tensor(4),
                       spikes=tensor(1), flagged=tensor(True))
        >>> torch.equal(state.params["weight"], before), int(state.step)
        (True, 5)
    """
    _check(window, threshold, min_rise, action, max_skips)

    def init(state):
        device = state.step.device
        return LossSpikeState(torch.zeros(window, dtype=torch.float64, device=device),
                              torch.zeros((), dtype=torch.int64, device=device),
                              torch.zeros((), dtype=torch.int64, device=device),
                              torch.zeros((), dtype=torch.bool, device=device))

    def fn(state, event):
        spike = callback_state(state, name)
        value = monitored_value(event, monitor, spike.window.device)
        hit = is_spike(value, spike, threshold, min_rise)
        window, seen = _accept(spike, value, ~hit)
        new = LossSpikeState(window, seen, spike.spikes + hit.long(), hit)
        state = set_callback_state(state, name, new)
        if action == "log":
            return state, Control(log=hit)
        stop = hit if action == "stop" else (
            new.spikes >= max_skips if max_skips is not None else False)
        return state, Control(stop=stop, skip=hit)

    return Callback(name=name, init=init, fn=fn, kinds=("step_end",), skips=action != "log")
