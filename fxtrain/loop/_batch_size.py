"""``fx.find_batch_size``: the largest batch a train step fits in memory (Lightning's
``BatchSizeFinder``, mode ``power`` then ``binsearch``).

Each trial runs real calls of the user's step on batches of one size, from the state it was
given and without donating it, so the state comes back untouched, whatever happened. A size
fits when its calls finish and their peak (``fxtrain._memory.measured``: the allocator's peak
on CUDA, torch's CPU allocator's running total on the CPU) plus the state's own tensors stays
within ``max_bytes``, when given. On CUDA a size that does not fit is mostly one that raised
``torch.OutOfMemoryError``: the error is caught, the trial's tensors dropped, the allocator's
cached blocks released, and the search goes on. On the CPU running out of memory ends the
process (the kernel's OOM killer) rather than raising, so there ``max_bytes`` is required.

The search doubles the size from ``init_size`` until one does not fit (or ``max_size`` is
reached), then bisects between the largest that fitted and the smallest that did not, to within
1/32 of the largest (Lightning bisects to 1; each trial of a new size may compile). The result
is that largest size less a ``margin`` (a fraction of it): the peak moves with the data (a
longer sequence, a fuller batch of packed documents) and the allocator fragments over a long
run.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch

from .. import donation
from .._memory import Held, format_bytes, held, measured, out_of_memory
from ..data._batches import as_stream
from ..data._feed import to_device
from ..protocol import init
from ..step._graphs import CudaGraphed
from ..step._k_steps import take
from ..step._spec import step_spec

__all__ = ["BatchSizeFind", "Trial", "find_batch_size"]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One size tried: whether it ``fits``, the calls' ``peak`` bytes (None where they raised)
    and, when it does not fit, ``why`` (``"out of memory"``, ``"over max_bytes"``)."""

    batch_size: int
    fits: bool
    peak: int | None
    why: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchSizeFind:
    """What ``find_batch_size`` found.

    Attributes:
      batch_size: the size to train with: ``largest`` less the margin.
      largest: the largest size that fitted.
      margin: the fraction of ``largest`` left free.
      tried: every trial, in order.
      max_bytes: the cap the trials were held to (None: only out-of-memory errors).
      held: the state's accounting, with the peak of the largest size that fitted.
    """

    batch_size: int
    largest: int
    margin: float
    tried: tuple[Trial, ...]
    max_bytes: int | None
    held: Held
    make_data: Callable[[int], Any] = dataclasses.field(repr=False, compare=False)

    def data(self) -> Any:
        """The data stream at ``batch_size``: ``make_data(batch_size)``."""
        return self.make_data(self.batch_size)

    def trace(self) -> str:
        """The search, one line per trial."""
        lines = [f"{t.batch_size:>7}  {'fits' if t.fits else 'does not fit':<12}  "
                 f"peak {format_bytes(t.peak)}" + (f"  ({t.why})" if t.why else "")
                 for t in self.tried]
        return "\n".join([*lines, f"largest {self.largest}, margin {self.margin:g}: batch size "
                          f"{self.batch_size}"])


class NoBatchSizeFits(RuntimeError):
    """``find_batch_size`` found no size that fits (its message: the trials and the levers)."""


def find_batch_size(state: Any, train_step: Callable, make_data: Callable[[int], Any], *,
                    init_size: int = 2, max_size: int | None = None,
                    max_bytes: int | None = None, margin: float = 0.1, steps: int = 2,
                    max_trials: int = 25) -> BatchSizeFind:
    """The largest batch size ``train_step`` fits in memory, less a margin (see the module).

    Args:
      state: the ``TrainState`` to train; it is not changed and not donated.
      train_step: the step ``fit`` will run (compiled or not; a ``cuda_graphed`` step's trials
        run the step it wraps, and ``fit`` captures its graph at the chosen size).
      make_data: the data at a batch size: ``make_data(batch_size)`` returns what ``fit``
        takes (``fx.data.Batches``, a loader, an iterable of batches).
      init_size: the first size tried.
      max_size: the largest size worth trying (the dataset's size, say).
      max_bytes: the memory a step may use: the state's tensors plus the step's peak. Required
        on the CPU; on CUDA it caps the search below the device's own limit.
      margin: the fraction of the largest fitting size left free, in ``[0, 1)``.
      steps: calls per trial (the first of a new size compiles; the peak is of all of them on
        CUDA and of the calls after the first on the CPU).
      max_trials: trials at most.

    Returns:
      A ``BatchSizeFind``: ``batch_size``, the ``tried`` sizes and their outcome, the margin,
      ``data()`` (the data at that size) and ``trace()``.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(4096, 64)
        >>> y = x.sum(1, keepdim=True)
        >>> state = fx.TrainState.create(nn.Sequential(nn.Linear(64, 256), nn.GELU(),
        ...                              nn.Linear(256, 1)), fx.optim.adam(1e-3))
        >>> found = fx.find_batch_size(state, fx.make_train_step(loss_fn),
        ...                            lambda b: fx.data.Batches((x, y), b, seed=0),
        ...                            init_size=64, max_bytes=2**20, steps=1)
        >>> [(t.batch_size, t.fits) for t in found.tried]
        [(64, True), (128, True), (256, False), (192, False), (160, True), (176, True),
         (184, True), (188, True)]
        >>> found.largest, found.batch_size  # 188 less 10%
        (188, 169)
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), found.data(), max_steps=2)
    """
    _check(state, init_size, max_size, max_bytes, margin, steps, max_trials)
    device = state.step.device
    if max_bytes is None and device.type != "cuda":
        raise ValueError(f"find_batch_size: on {device.type} running out of memory ends the "
                         "process instead of raising an error, so the search needs a cap: "
                         "pass max_bytes= (the memory the state and a step may use)")
    step, kwargs = _trial_step(train_step)
    spec = step_spec(step)
    ready = init((*spec.step_states, *spec.in_step_callbacks), state).replace(data=None)

    def fits(size: int) -> Trial:
        try:
            data = make_data(size)
        except ValueError as e:  # past the data's size (Batches: no batch of that size)
            if size == init_size:
                raise
            return Trial(size, False, None, f"make_data({size}) raised ValueError: {e}")
        return _trial(ready, step, kwargs, data, size, steps, max_bytes, spec.steps_per_call)

    tried = _search(fits, init_size, max_size, max_trials)
    good = [t for t in tried if t.fits]
    if not good:
        raise NoBatchSizeFits(f"find_batch_size: no batch size fits, not even 1 "
                           f"({_failures(tried)}); the state alone holds "
                           f"{held(state).describe()}. Levers: fx.remat, the chunked loss "
                           "(fx.losses), fx.shard over more devices, a lower precision")
    best = max(good, key=lambda t: t.batch_size)
    return BatchSizeFind(batch_size=max(1, int(best.batch_size * (1 - margin))),
                         largest=best.batch_size, margin=margin, tried=tuple(tried),
                         max_bytes=max_bytes, held=held(state, best.peak), make_data=make_data)


def _check(state: Any, init_size: int, max_size: int | None, max_bytes: int | None,
           margin: float, steps: int, max_trials: int) -> None:
    donation.check_live(state, "find_batch_size")
    for name, value, optional in (("init_size", init_size, False), ("max_size", max_size, True),
                                  ("max_bytes", max_bytes, True), ("steps", steps, False),
                                  ("max_trials", max_trials, False)):
        if not (value is None and optional) and (isinstance(value, bool)
                                                 or not isinstance(value, int)):
            raise TypeError(f"find_batch_size: {name} must be an int"
                            f"{' or None' if optional else ''}, got {value!r}"
                            + (" (in bytes: 2**20 for 1 MiB)" if name == "max_bytes" else ""))
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"find_batch_size: margin must be a number in [0, 1), got {margin!r}")
    if init_size < 1 or (max_size is not None and max_size < init_size):
        raise ValueError(f"find_batch_size: need 1 <= init_size <= max_size, got {init_size} "
                         f"and {max_size}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"find_batch_size: max_bytes must be positive, got {max_bytes}")
    if not 0 <= margin < 1:
        raise ValueError(f"find_batch_size: margin must be in [0, 1), got {margin}")
    if steps < 1 or max_trials < 1:
        raise ValueError(f"find_batch_size: steps and max_trials must be at least 1, got "
                         f"{steps} and {max_trials}")


def _trial_step(train_step: Callable) -> tuple[Callable, dict]:
    """The step the trials call and its keywords: never donating (the state is the caller's)."""
    if isinstance(train_step, CudaGraphed):  # its graph is captured at fit's batch size
        train_step = train_step.step
    spec = step_spec(train_step)
    if spec.donate is True:
        raise ValueError("find_batch_size: this step always donates the state it is given, "
                         "which the trials must leave untouched; build it with donate=None "
                         "(the default: fit asks it to donate) for the search")
    return train_step, ({"donate": False} if spec.takes_donate else {})


def _search(fits: Callable[[int], Trial], init_size: int, max_size: int | None,
            max_trials: int) -> list[Trial]:
    """Doubling from ``init_size`` until a size does not fit (halving when the first does
    not), then bisection between the largest that fitted and the smallest that did not, until
    they are within 1/32 of the first."""
    tried: list[Trial] = []
    low, high, size = 0, None, init_size  # low fits (0: none yet); high does not
    while len(tried) < max_trials:
        trial = fits(size)
        tried.append(trial)
        if trial.fits:
            low = size
        else:
            high = size
        if high is None:  # doubling
            if max_size is not None and size >= max_size:
                break
            size = size * 2 if max_size is None else min(size * 2, max_size)
        elif high - low <= max(1, low // 32):  # within 3% (the margin leaves more)
            break
        elif low == 0 and high > 1:  # the first size did not fit: halve
            size = high // 2
        else:
            size = (low + high) // 2
    return tried


def _trial(state: Any, step: Callable, kwargs: dict, data: Any, size: int, steps: int,
           max_bytes: int | None, k: int) -> Trial:
    """``steps`` calls of ``step`` on batches of ``data`` from ``state``, never kept; the peak
    of the calls measured (after the first, on the CPU), the memory released after."""
    device = state.step.device
    stream = as_stream(data, state.layout)
    position, peak, oom = stream.init(), 0, False
    try:
        for i in range(steps):
            batch, position, _ = take(stream, position, k)
            if i == 0:
                given = _examples(batch, k)
                if given is not None and given > size:
                    raise ValueError(
                        f"find_batch_size: make_data({size}) gave batches of {given} examples: "
                        "it must build batches of the size it is given (as "
                        "fx.data.Batches(arrays, size) does), or no size the search reports "
                        "would have run")
                if given is not None and given < size:  # the data holds fewer: not this size
                    return Trial(size, False, None, f"the data gives batches of {given}")
            batch = to_device(batch, device)
            if device.type != "cuda" and i == 0 and steps > 1:
                step(state, batch, **kwargs)  # compiles; the CPU's peak is of the calls after
                continue
            with measured(device) as measure:
                step(state, batch, **kwargs)
            peak = max(peak, measure.bytes)
    except Exception as e:
        if not out_of_memory(e):
            raise
        oom = True  # the handler's end drops the error and its frames (the tensors they hold)
    batch = None
    _release(device)
    if oom:
        return Trial(size, False, None, "out of memory")
    if max_bytes is not None and held(state).state + peak > max_bytes:
        return Trial(size, False, peak, "over max_bytes")
    return Trial(size, True, peak)


def _examples(batch: Any, k: int) -> int | None:
    """The examples in a batch: its first tensor's leading dimension (the second where ``k``
    steps per call stack ``k`` batches); None for a batch without tensors."""
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > (1 if k > 1 else 0):
            return leaf.shape[1 if k > 1 else 0]
    return None


def _release(device: torch.device) -> None:
    """The trial's tensors freed (an out-of-memory error's frames hold them until collected)
    and, on CUDA, the allocator's cached blocks given back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failures(tried: list[Trial]) -> str:
    return ", ".join(f"{t.batch_size}: {t.why}" for t in tried if not t.fits)
