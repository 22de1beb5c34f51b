"""``progress_bar``: tqdm bars for training and the current epoch, and a line per evaluation.

The bars are ephemeral host objects held in the callback's closure, never in the state; they
are re-created on every train_begin, so a resumed run starts its bar at the resumed step.
On most steps a step_end costs one comparison: the bars move, and the metrics are read from the
device (one sync for all of them), only on the first step, every ``refresh_every`` steps (but at
most once per ``min_interval`` seconds), at epoch ends and at train_end. So the display lags
training by up to ``refresh_every`` steps.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm  # widgets in notebooks
else:  # tqdm.auto would warn in every notebook that widgets are missing; text bars work there
    from tqdm.std import tqdm

from ..logging.numbers import format_scalars, is_number, read_floats
from .combinators import rank_zero
from .core import NOTHING, Callback

_KINDS = ("train_begin", "step_end", "eval_end", "epoch_end", "train_end")


def _ema(old: float | None, new: float, smoothing: float) -> float:
    """``smoothing * old + (1 - smoothing) * new``; a first or non-finite value starts afresh."""
    if old is None or not (math.isfinite(old) and math.isfinite(new)):
        return new
    return smoothing * old + (1.0 - smoothing) * new


def _total(info: Mapping[str, Any]) -> int | None:
    """The step the run ends at: the nearer of max_steps and steps_per_epoch * max_epochs."""
    max_steps, epochs, per_epoch = (info.get(k) for k in
                                    ("max_steps", "max_epochs", "steps_per_epoch"))
    ends = [max_steps] if max_steps is not None else []
    if epochs is not None and per_epoch is not None:
        ends.append(epochs * per_epoch)
    return min(ends) if ends else None


def _epoch_desc(epoch: int, info: Mapping[str, Any]) -> str:
    epochs = info.get("max_epochs")
    return f"epoch {epoch + 1}" + (f"/{epochs}" if epochs is not None else "")


class _Display:
    """The settings, open bars and smoothed values of one progress bar (host only, mutable)."""

    __slots__ = ("names", "smoothing", "refresh_every", "leave", "file", "out", "train",
                 "epoch", "info", "metrics", "ema", "next_refresh", "refreshed_at", "min_interval",
                 "read_at", "next_epoch")

    def __init__(self, names, smoothing, refresh_every, min_interval, leave, file):
        self.names, self.smoothing, self.refresh_every = names, smoothing, refresh_every
        self.leave, self.file, self.out = leave, file, sys.stderr
        self.train = self.epoch = self.metrics = None
        self.info, self.ema = {}, {}
        self.next_refresh = self.refreshed_at = -1
        self.min_interval, self.read_at = min_interval, -math.inf
        self.next_epoch: tuple | None = None  # (description, first step): a reset not yet drawn


def _close(d: _Display) -> None:
    for bar in (d.epoch, d.train):
        if bar is not None:
            bar.close()
    d.train = d.epoch = d.metrics = None


def _begin(d: _Display, event) -> None:
    """Opens the training bar at the event's step, and the epoch bar when epochs have a size."""
    _close(d)
    d.next_epoch = None
    d.out, d.info = d.file or sys.stderr, dict(event.metrics or {})
    d.ema, d.next_refresh, d.refreshed_at = {}, event.step + 1, -1
    width = _width(d.out)
    d.train = tqdm(total=_total(d.info), initial=event.step, desc="train", leave=d.leave,
                   file=d.out, **width)
    per_epoch = d.info.get("steps_per_epoch")
    if per_epoch:
        done = min(max(event.step - event.epoch * per_epoch, 0), per_epoch)
        d.epoch = tqdm(total=per_epoch, initial=done, desc=_epoch_desc(event.epoch, d.info),
                       leave=False, file=d.out, **width)


def _width(out: TextIO) -> dict:
    """The bars follow the terminal's width, but a terminal that reports none (a pseudo-terminal
    opened without a size, as some containers and CI runners give) gets 100 columns and 24
    rows: tqdm would draw nothing in 0."""
    try:
        if 0 in os.get_terminal_size(out.fileno()):
            return {"ncols": 100, "nrows": 24}
    except (AttributeError, OSError, ValueError):  # not a terminal, or no file descriptor
        pass
    return {"dynamic_ncols": True}


def _refresh(d: _Display, step: int) -> None:
    """Reads the shown metrics (one sync), smooths them and sets the training bar's postfix."""
    values = list(read_floats({n: _lookup(d.metrics, n) for n in d.names}).values())
    d.ema = {n: _ema(d.ema.get(n), v, d.smoothing) for n, v in zip(d.names, values)}
    d.train.set_postfix_str(format_scalars(d.ema, sep=", "), refresh=False)
    d.refreshed_at = step
    d.next_refresh = (step // d.refresh_every + 1) * d.refresh_every


def _epoch_end(d: _Display, event) -> None:
    """Starts the epoch bar over for the next epoch (the last one stays full). A reset redraws,
    so when the bars were drawn less than ``min_interval`` ago (short epochs of fast steps) it
    waits for the next time they move."""
    epochs = d.info.get("max_epochs")
    if d.epoch is not None and (epochs is None or event.epoch + 1 < epochs):
        d.next_epoch = (_epoch_desc(event.epoch + 1, d.info), event.step)
        if time.monotonic() - d.read_at < d.min_interval:
            return  # drawn moments ago: the bars move at their next refresh
    if d.train is not None:
        _advance(d, event.step)


def _eval_end(d: _Display, event) -> None:
    """Writes one line with the evaluation's metrics above the bars."""
    if not event.metrics:
        return
    numbers = {k: v for k, v in event.metrics.items() if is_number(v)}  # not a matrix
    tqdm.write(f"eval @ step {event.step}: {format_scalars(read_floats(numbers))}",
               file=d.file or sys.stderr)


def _end(d: _Display, event) -> None:
    """Shows the last metrics and the final step, says why training ended early, closes."""
    if d.train is None:
        return
    if d.metrics is not None and d.refreshed_at != event.step:
        _refresh(d, event.step)
    _advance(d, event.step)
    reason = (event.metrics or {}).get("reason")
    if reason not in (None, "max_steps", "max_epochs"):
        tqdm.write(f"training ended at step {event.step}: {reason}", file=d.out)
    _close(d)


_HOOKS = {"train_begin": _begin, "epoch_end": _epoch_end, "eval_end": _eval_end,
          "train_end": _end}


def _advance(d: _Display, step: int) -> None:
    taken = step - d.train.n
    if d.next_epoch is not None:  # the epoch bar starts over (a redraw), at the epoch's steps
        (desc, first), d.next_epoch = d.next_epoch, None
        d.epoch.set_description(desc, refresh=False)
        d.epoch.reset(total=d.info["steps_per_epoch"])
        d.epoch.update(step - first)
    elif d.epoch is not None:
        d.epoch.update(taken)
    d.train.update(taken)


def _step_end(d: _Display, event) -> None:
    """The per-step path: a comparison; the bars move (and metrics are read) when due."""
    d.metrics = event.metrics
    if event.step >= d.next_refresh:
        now = time.monotonic()
        if now - d.read_at < d.min_interval:  # fast steps: at most one read per interval
            d.next_refresh += d.refresh_every
            return
        d.read_at = now
        _refresh(d, event.step)
        _advance(d, event.step)


def progress_bar(metric: str | Sequence[str] = "loss", *, smoothing: float = 0.3,
                 refresh_every: int = 10, min_interval: float = 0.1, leave: bool = True,
                 file: TextIO | None = None, name: str = "progress_bar") -> Callback:
    """A host callback showing training progress with tqdm (widgets in notebooks).

    A training bar counts steps up to max_steps (or steps_per_epoch * max_epochs) with the
    smoothed metrics as its postfix; an epoch bar counts the steps of the current epoch when
    steps_per_epoch is known; each evaluation writes one line with its metrics. Only rank 0
    shows anything.

    Args:
      metric: the step metric(s) to show: a name or a sequence of names.
      smoothing: weight of the past in the exponential moving average of the shown values,
        in [0, 1): ``shown = smoothing * shown + (1 - smoothing) * value``; 0 shows raw values.
      refresh_every: read the metrics from the device every this many steps...
      min_interval: ...but at most once per this many seconds (fast steps skip reads).
      leave: keep the training bar on screen after training.
      file: where the bars go (default ``sys.stderr``); notebook widgets ignore it.
      name: the callback's name.

    Returns:
      A stateless host ``Callback``.

    Examples:
        Two epochs of 8 steps with an evaluation at each epoch end. The ``...`` stand for the
        bars' redraws (with terminal control codes), their timings and the values shown:

        >>> import sys
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> bar = fx.callbacks.progress_bar(["loss", "grad_norm"], file=sys.stdout)
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                max_epochs=2, eval_step=fx.make_eval_step(loss_fn),
        ...                eval_data=[batch], callbacks=[bar])
        train:   0%| ...
        ...eval @ step 8: loss=...
        ...eval @ step 16: loss=...
        ...train: 100%|...| 16/16 [..., loss=..., grad_norm=...]
    """
    names = _metric_names(metric)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"progress_bar: smoothing must be in [0, 1), got {smoothing}")
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"progress_bar: refresh_every must be a positive int, got "
                         f"{refresh_every!r}")
    d = _Display(names, smoothing, refresh_every, min_interval, leave, file)

    def fn(state, event):
        if event.kind == "step_end":
            if d.train is not None:  # None before train_begin
                _step_end(d, event)
        else:
            _HOOKS[event.kind](d, event)
        return state, NOTHING

    return rank_zero(Callback(name=name, init=None, fn=fn, kinds=_KINDS, host=True,
                              display=True))


def interactive(stream: TextIO | None = None) -> bool:
    """Whether someone watches ``stream`` (standard error): a terminal, or a Jupyter kernel's
    notebook. Not a file, a pipe or a captured stream (a log, CI, pytest)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell is not None else None
    return type(ip).__name__ == "ZMQInteractiveShell"  # a notebook's kernel (not a terminal's)


def with_default_progress(callbacks: tuple, progress: bool | None) -> tuple:
    """``fit``'s callbacks with a ``progress_bar`` first when ``progress`` asks for one (None:
    when ``interactive()``) and none of them shows progress already."""
    if progress is False or (progress is None and not interactive()):
        return callbacks
    if any(isinstance(cb, Callback) and cb.display for cb in callbacks):
        return callbacks
    return (progress_bar(), *callbacks)


def _metric_names(metric: str | Sequence[str]) -> tuple[str, ...]:
    names = (metric,) if isinstance(metric, str) else tuple(metric)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"progress_bar: metric must be a name or a non-empty sequence of "
                         f"names, got {metric!r}")
    return names


def _lookup(metrics: Mapping[str, Any] | None, name: str) -> Any:
    if not metrics or name not in metrics:
        raise ValueError(f"progress_bar: no metric {name!r} in the step's metrics; available: "
                         f"{sorted(metrics or {})}. Pass metric=... with names from those.")
    return metrics[name]
