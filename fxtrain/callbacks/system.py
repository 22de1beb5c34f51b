"""``system_monitor``: CPU, RAM and GPU use of the machine and of this process, every N steps.

Readings come from psutil when it is installed (``pip install 'fxtrain[monitor]'``), else from
Linux's ``/proc`` (``/proc/stat``, ``/proc/meminfo``, ``/proc/self/statm``); the process's CPU
time comes from ``time.process_time`` everywhere. Where neither is there (macOS without psutil) the
machine-wide readings are left out, not guessed. GPU readings need CUDA in use in this process;
``torch.cuda.utilization`` needs NVIDIA's ``pynvml`` (``pip install nvidia-ml-py``) and is left
out without it. Nothing here touches a tensor of the run, so no reading waits for the device.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch

from . import combinators
from .core import NOTHING, Callback
from .monitors import _rss_bytes
from .publish import publish

MIB = 2.0 ** 20


class CpuSample(NamedTuple):
    """Clock readings that CPU percentages are differences of."""

    wall: float  # seconds, monotonic
    process: float  # this process's CPU seconds (user + system)
    busy: float | None  # the machine's busy CPU time (any unit), None where unknown
    total: float | None  # the machine's total CPU time (same unit)


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _machine_cpu(psutil) -> tuple[float | None, float | None]:
    """(busy, total) CPU time of the whole machine since boot."""
    if psutil is not None:
        t = psutil.cpu_times()  # on Linux, user and nice include guest and guest_nice
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total - t.idle - getattr(t, "iowait", 0.0), total
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None, None
    total = sum(fields)
    return total - fields[3] - fields[4], total  # less idle and iowait


def _machine_ram(psutil) -> tuple[float, float] | None:
    """(used, total) bytes of the machine's RAM; used = total - available."""
    if psutil is not None:
        vm = psutil.virtual_memory()
        return float(vm.total - vm.available), float(vm.total)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"] - info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def cpu_sample() -> CpuSample:
    """The clocks now (machine CPU time from psutil or ``/proc/stat``; None where unknown)."""
    busy, total = _machine_cpu(_psutil())
    return CpuSample(time.monotonic(), time.process_time(), busy, total)


def _gpu(device: int) -> dict[str, float]:
    free, total = torch.cuda.mem_get_info(device)
    out = {"system/gpu_memory_used_mib": (total - free) / MIB,
           "system/gpu_memory_percent": 100.0 * (total - free) / total}
    try:
        out["system/gpu_utilization_percent"] = float(torch.cuda.utilization(device))
    except (ImportError, RuntimeError):  # no pynvml (or amdsmi on ROCm)
        pass
    return out


def system_usage(since: CpuSample | None = None) -> tuple[dict[str, float], CpuSample]:
    """Readings now, and the clocks to pass as ``since`` next time.

    CPU percentages are averages since ``since`` (left out without it):
    ``system/cpu_percent`` of the whole machine (0-100), ``system/process_cpu_percent`` of
    this process in percent of one core (400 is four cores busy, as ``top`` shows it). Memory:
    ``system/process_rss_mib``, ``system/ram_used_mib`` and ``system/ram_percent`` (used is
    total less available). On CUDA (once this process uses it), of the current device:
    ``system/gpu_memory_used_mib`` and ``system/gpu_memory_percent`` (every process's, from
    ``torch.cuda.mem_get_info``) and ``system/gpu_utilization_percent`` (with pynvml).

    Examples:
        >>> from fxtrain.callbacks.system import system_usage
        >>> readings, sample = system_usage()
        >>> sorted(readings)  # and system/gpu_* once CUDA is in use
        ['system/process_rss_mib', 'system/ram_percent', 'system/ram_used_mib']
        >>> import time
        >>> time.sleep(0.05)  # long enough for the CPU clocks to tick
        >>> readings, _ = system_usage(sample)
        >>> 0 <= readings["system/cpu_percent"] <= 100
        True
    """
    now = cpu_sample()
    out: dict[str, float] = {}
    if since is not None and now.wall > since.wall:
        if now.total is not None and since.total is not None and now.total > since.total:
            # clamped, as psutil.cpu_percent does: a VM's idle counter can step back a tick
            share = (now.busy - since.busy) / (now.total - since.total)
            out["system/cpu_percent"] = 100.0 * min(max(share, 0.0), 1.0)
        out["system/process_cpu_percent"] = 100.0 * (now.process - since.process) / (
            now.wall - since.wall)
    out["system/process_rss_mib"] = _rss_bytes() / MIB
    ram = _machine_ram(_psutil())
    if ram is not None:
        out["system/ram_used_mib"] = ram[0] / MIB
        out["system/ram_percent"] = 100.0 * ram[0] / ram[1]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(_gpu(torch.cuda.current_device()))
    return out, now


def system_monitor(every: int = 100, *, writer: Any = None,
                   name: str = "system_monitor") -> Callback:
    """Publishes CPU utilisation, process and machine memory, and GPU utilisation and memory
    every ``every`` steps (see ``system_usage`` for each reading), and at train_end.

    CPU percentages average over the steps since the last reading (the first, since
    train_begin); ``system/cpu_percent`` is left out of a window too short for the machine's
    CPU clock to tick (10 ms on Linux), such as the train_end reading right after a due step. A host callback: it reads the operating system, never the device, so it
    adds no sync, and ``make_train_step`` refuses it. Under torch.distributed every rank
    reads, rank 0 publishes (its own process and GPU), as ``memory_monitor`` does.

    Args:
      every: steps between readings.
      writer: where readings go (default the log).

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:  # the memory readings (the CPU ones vary with the machine's load)
        ...     def write_scalars(self, step, scalars):
        ...         print(step, sorted(k for k in scalars if k.endswith("_mib")))
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=4,
        ...                callbacks=[fx.callbacks.system_monitor(2, writer=Show())])
        2 ['system/process_rss_mib', 'system/ram_used_mib']
        4 ['system/process_rss_mib', 'system/ram_used_mib']
        4 ['system/process_rss_mib', 'system/ram_used_mib']
    """
    last: dict[str, CpuSample] = {}  # the clocks at the last reading (this process)

    def fn(state, event):
        if event.kind == "train_begin":
            last["sample"] = cpu_sample()
            return state, NOTHING
        readings, last["sample"] = system_usage(last.get("sample"))
        publish(writer, event.step, readings, what="system")
        return state, NOTHING

    return combinators.every(every, Callback(name, None, fn,
                                             kinds=("train_begin", "step_end", "train_end"),
                                             host=True))
