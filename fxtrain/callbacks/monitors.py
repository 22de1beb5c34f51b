"""Host monitors: learning rate, throughput and memory, read when due and published.

Each publishes to a writer (``write_scalars``) or, without one, to the console (``publish``). They
keep no state in the pytree: their readings describe this process, not the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ..optim.wrappers import injected_hyperparams, learning_rate
from . import combinators
from .core import NOTHING, Callback
from .flops import device_peak_flops
from ..logging.numbers import read_floats
from .publish import publish


def lr_monitor(every: int = 50, *, writer: Any = None, name: str = "lr_monitor") -> Callback:
    """Publishes the learning rate and the other injected hyperparameters every ``every`` steps.

    Examples:
        A learning rate decaying linearly from 0.1 to 0 over 4 steps (the rate each update
        used), and an optimizer with injected hyperparameters:

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:  # a writer; without one, readings go to the console
        ...     def write_scalars(self, step, scalars):
        ...         print(step, {k: round(v, 4) for k, v in scalars.items()})
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> train_step = fx.make_train_step(loss_fn)
        >>> tx = fx.optim.sgd(fx.optim.linear_schedule(0.1, 0.0, transition_steps=4))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), tx)
        >>> state = fx.fit(state, train_step, data, max_steps=4,
        ...                callbacks=[fx.callbacks.lr_monitor(2, writer=Show())])
        2 {'learning_rate': 0.075}
        4 {'learning_rate': 0.025}
        >>> tx = fx.optim.inject_hyperparams(fx.optim.adam)(learning_rate=0.1, b1=0.8)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), tx)
        >>> state = fx.fit(state, train_step, data, max_steps=2,
        ...                callbacks=[fx.callbacks.lr_monitor(2, writer=Show())])
        2 {'hparams/learning_rate': 0.1, 'hparams/b1': 0.8, 'learning_rate': 0.1}
    """

    def fn(state, event):
        values = {f"hparams/{k}": v for k, v in injected_hyperparams(state.opt_state).items()}
        lr = learning_rate(state.opt_state)
        if lr is not None:
            values["learning_rate"] = lr
        if values:
            publish(writer, event.step, read_floats(values), what="optimizer")
        return state, NOTHING

    return combinators.every(every, Callback(name, None, fn, kinds=("step_end",), host=True))


def throughput(every: int = 50, *, batch_size: int | None = None,
               tokens_per_batch: int | None = None, flops_per_step: float | None = None,
               peak_flops: float | None = None, writer: Any = None,
               time_fn: Callable[[], float] = time.perf_counter,
               name: str = "throughput") -> Callback:
    """Steps, samples, tokens and FLOPs per second over each window of ``every`` steps, and the
    model FLOPs utilisation (MFU).

    Reading the clock alone would time how fast steps are queued on an accelerator, so at the
    end of each window it waits for the step (one sync per window).

    With ``flops_per_step`` (from ``fx.callbacks.count_step_flops``, counted once before the
    run: a compiled step cannot be counted) it reports ``throughput/flops_per_sec``, and
    ``throughput/mfu`` = FLOP/s / peak FLOP/s. The peak is ``peak_flops``, or else the bf16
    dense peak of the GPU the state's parameters live on (``fx.callbacks.device_peak_flops``,
    a table of known GPUs). A CPU has no such table entry (its peak depends on the core count,
    the vector units and the clock), so on a CPU without ``peak_flops`` the MFU is left out
    rather than guessed; so it is on a GPU the table does not know.

    Args:
      every: steps per window.
      batch_size: samples per step (default: what ``fit`` reports for its data).
      tokens_per_batch: tokens per step, to report tokens/s.
      flops_per_step: FLOPs of one step, to report FLOP/s and MFU.
      peak_flops: the device's peak FLOP/s, for MFU (default: looked up for known GPUs in
        bf16; pass ``fx.callbacks.device_peak_flops(dtype=torch.float32)`` for a float32 run).
      writer: where readings go (default the log).
      time_fn: the clock (injectable for tests).

    Examples:
        On a fake clock where each reading is 0.5 s after the last, windows of 2 steps:

        >>> import itertools
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:  # a writer; without one, readings go to the console
        ...     def write_scalars(self, step, scalars):
        ...         print(step, {k: round(v, 4) for k, v in scalars.items()})
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> clock = itertools.count(0.0, 0.5)
        >>> speed = fx.callbacks.throughput(2, tokens_per_batch=4 * 128, writer=Show(),
        ...                                 time_fn=lambda: next(clock))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=4,
        ...                callbacks=[speed])
        2 {'throughput/steps_per_sec': 4.0, 'throughput/samples_per_sec': 16.0,
           'throughput/tokens_per_sec': 2048.0}
        4 {'throughput/steps_per_sec': 4.0, 'throughput/samples_per_sec': 16.0,
           'throughput/tokens_per_sec': 2048.0}

        FLOP/s and MFU, with the FLOPs of one step counted beforehand and a peak given (on a
        known GPU the peak is looked up):

        >>> flops = fx.callbacks.count_step_flops(loss_fn, state, next(iter(data)))
        >>> flops  # 2 * 4 * 2 * 1 forward, the weight's gradient as much again
        32
        >>> clock = itertools.count(0.0, 0.5)
        >>> speed = fx.callbacks.throughput(2, flops_per_step=flops, peak_flops=256.0,
        ...                                 writer=Show(), time_fn=lambda: next(clock))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=6,
        ...                callbacks=[speed])  # on from step 4
        6 {'throughput/steps_per_sec': 4.0, 'throughput/samples_per_sec': 16.0,
           'throughput/flops_per_sec': 128.0, 'throughput/mfu': 0.5}
    """
    _check_positive("flops_per_step", flops_per_step)
    _check_positive("peak_flops", peak_flops)
    if peak_flops is not None and flops_per_step is None:
        raise ValueError("throughput: peak_flops needs flops_per_step (the FLOPs of one step, "
                         "from fx.callbacks.count_step_flops) to compute the MFU")
    window: dict[str, Any] = {}  # start time and step of the current window (this process)

    def fn(state, event):
        if event.kind == "train_begin":
            size = batch_size or (event.metrics or {}).get("batch_size")
            peak = peak_flops or (flops_per_step and _peak_of(state))
            window.update(time=time_fn(), step=event.step, batch_size=size, peak=peak)
            return state, NOTHING
        if not window:
            return state, NOTHING
        _wait_for(event.metrics)
        now = time_fn()
        steps, seconds = event.step - window["step"], max(now - window["time"], 1e-12)
        rates = {"throughput/steps_per_sec": steps / seconds}
        if window["batch_size"]:
            rates["throughput/samples_per_sec"] = steps * window["batch_size"] / seconds
        if tokens_per_batch:
            rates["throughput/tokens_per_sec"] = steps * tokens_per_batch / seconds
        if flops_per_step:
            rates["throughput/flops_per_sec"] = steps * flops_per_step / seconds
            if window["peak"]:
                rates["throughput/mfu"] = rates["throughput/flops_per_sec"] / window["peak"]
        window.update(time=now, step=event.step)
        publish(writer, event.step, rates, what="throughput")
        return state, NOTHING

    return combinators.every(every, Callback(name, None, fn, kinds=("train_begin", "step_end"),
                                             host=True))


def _check_positive(what: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not value > 0):
        raise ValueError(f"throughput: {what} must be a positive number, got {value!r}")


def _peak_of(state) -> float | None:
    """The bf16 peak FLOP/s of the GPU holding the state's parameters (None on a CPU)."""
    leaves = list(state.params.values()) if state.params else []
    return device_peak_flops(leaves[0].device) if leaves else None


def _wait_for(metrics) -> None:
    """Blocks until the step that produced ``metrics`` has run (one read of one value)."""
    for value in (metrics or {}).values():
        if isinstance(value, torch.Tensor):
            (value if value.dim() == 0 else value.reshape(-1)[0]).item()
            return


def process_memory() -> dict[str, float]:
    """This process's resident memory, and CUDA allocated/peak/reserved when in use, in MiB.

    Examples:
        >>> from fxtrain.callbacks.monitors import process_memory
        >>> process_memory()  # and memory/cuda_* once CUDA is in use
        {'memory/cpu_rss_mib': ...}
        >>> process_memory()["memory/cpu_rss_mib"] > 0
        True
    """
    mib = 2.0 ** 20
    out = {"memory/cpu_rss_mib": _rss_bytes() / mib}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/cuda_allocated_mib"] = torch.cuda.memory_allocated() / mib
        out["memory/cuda_peak_mib"] = torch.cuda.max_memory_allocated() / mib
        out["memory/cuda_reserved_mib"] = torch.cuda.memory_reserved() / mib
    return out


def _rss_bytes() -> float:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return float(psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # peak, not current, where /proc is missing (macOS reports bytes)
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_monitor(every: int = 100, *, writer: Any = None,
                   name: str = "memory_monitor") -> Callback:
    """Publishes CPU RSS (and CUDA allocated/peak/reserved on GPU) every ``every`` steps.

    Also at train_end, so a run's last reading is its final size.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, sorted(scalars))
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=5,
        ...                callbacks=[fx.callbacks.memory_monitor(2, writer=Show())])
        2 ['memory/cpu_rss_mib']
        4 ['memory/cpu_rss_mib']
        5 ['memory/cpu_rss_mib']
    """

    def fn(state, event):
        publish(writer, event.step, process_memory(), what="memory")
        return state, NOTHING

    return combinators.every(every, Callback(name, None, fn, kinds=("step_end", "train_end"),
                                             host=True))
