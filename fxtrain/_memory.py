"""What a train step holds in memory, by the state's own accounting, and a step's measured peak.

The accounting reads the state: its parameters (trainable), the gradients a step makes (one per
trainable parameter, of its size), the optimizer's state and the buffers (frozen parameters
among them). What else a step holds at its peak (activations kept for the backward, the loss's
blocks, the update's temporaries, and a new copy of the state when the step does not donate the
old one) is the step's measured peak less the gradients: ``measured`` gives that peak.

The peak is the memory a call allocates beyond what was live when it began:

- on CUDA, the caching allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``), less the bytes allocated at the start;
- on the CPU, the running total of torch's CPU allocator as torch's profiler reports it
  (``profile_memory=True``: an event per allocation and free), at its highest, less the total
  when the call began. It counts every tensor torch allocates (eager kernels and the buffers of
  a compiled graph alike), not the interpreter's own objects, and is the same from run to run
  for the same program (not so the resident set, which depends on the C allocator's caching).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .distributed import local_nbytes

__all__ = ["Held", "held", "measured", "format_bytes", "out_of_memory"]


def format_bytes(n: float | None) -> str:
    """``n`` bytes, readable: ``1.5 MiB``."""
    if n is None:
        return "not measured"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Held:
    """What a step holds, in bytes (this rank's shards of a sharded state).

    Attributes:
      parameters: the trainable parameters.
      gradients: the gradients a step makes (the trainable parameters' size).
      optimizer: the optimizer's state.
      buffers: the buffers, frozen parameters among them.
      peak: the step's measured peak beyond what was live before it (None: not measured).
      activations: what the peak holds beside the gradients: activations kept for the backward,
        temporaries, and a new state where the step does not donate the old one (None: not
        measured).
    """

    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    peak: int | None = None
    activations: int | None = None

    @property
    def state(self) -> int:
        """The state's own tensors: parameters, optimizer state and buffers."""
        return self.parameters + self.optimizer + self.buffers

    def describe(self) -> str:
        """One line: each part, readable."""
        parts = [f"parameters {format_bytes(self.parameters)}",
                 f"gradients {format_bytes(self.gradients)}",
                 f"optimizer state {format_bytes(self.optimizer)}",
                 f"buffers {format_bytes(self.buffers)}",
                 f"activations and temporaries {format_bytes(self.activations)}"]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


def held(state: Any, peak: int | None = None) -> Held:
    """The state's accounting, with the activations a measured ``peak`` implies.

    Examples:
        >>> from fxtrain._memory import held
        >>> state = fx.TrainState.create(nn.Linear(4, 2), fx.optim.adam(1e-3))
        >>> held(state, peak=100)  # 40 bytes of parameters; Adam: two moments, counts
        Held(parameters=40, gradients=40, optimizer=100, buffers=0, peak=100, activations=60)
    """
    parameters = local_nbytes(state.params)
    activations = None if peak is None else max(peak - parameters, 0)
    return Held(parameters=parameters, gradients=parameters,
                optimizer=local_nbytes(state.opt_state), buffers=local_nbytes(state.buffers),
                peak=peak, activations=activations)


def out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error`` is, or was raised from, ``torch.OutOfMemoryError`` or the CPU
    allocator's refusal (``DefaultCPUAllocator: can't allocate memory``, a RuntimeError; the
    compiler wraps an error raised while it compiles)."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or (
                isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class Peak:
    """The peak ``measured`` found, in ``bytes`` once its block has ended."""

    bytes: int | None = None


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[Peak]:
    """Measures the peak of the block's allocations on ``device`` (see the module).

    Examples:
        >>> from fxtrain._memory import measured
        >>> with measured(torch.device("cpu")) as peak:
        ...     a = torch.empty(1000, dtype=torch.uint8)
        ...     b = torch.empty(500, dtype=torch.uint8)
        ...     del a, b
        >>> peak.bytes
        1500
    """
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    if device.type != "cpu":
        raise ValueError(f"measuring memory on {device.type} is not supported (cpu, cuda)")
    activities = [torch.profiler.ProfilerActivity.CPU]
    with warnings.catch_warnings():  # frees of tensors made before: "of unknown size"
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            yield peak
        peak.bytes = _cpu_peak(prof)


def _cpu_peak(prof: Any) -> int:
    """The highest running total of the profiled block's CPU allocations, less the total
    before its first (read from the profiler's trace: its ``[memory]`` events)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="fxtrain-memory-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]"
                     and e["args"].get("Device Type") in (None, 0)),
                    key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    if not memory:
        return 0
    first = memory[0]["args"]
    base = first["Total Allocated"] - first["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] - base for e in memory))
