"""``swa``: stochastic weight averaging, the equal-weight running average of the parameters.

From step ``start``, every ``every`` steps, ``average <- average + (params - average) / (n + 1)``
and ``n <- n + 1`` (``torch.optim.swa_utils.AveragedModel``'s default rule, computed as it does
on the CPU; its first update copies the parameters). The average and ``n`` live in the state, so it runs inside the compiled
step or on the host and goes through checkpoints. ``with_swa_params(state)`` swaps the average
in; ``update_bn(state, data)`` recomputes BatchNorm statistics for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import struct
from .._torch.modules import BatchNorm
from ..state import set_training, with_step_buffers
from .core import Callback, NOTHING, callback_state, set_callback_state


@struct.dataclass
class SWAState:
    """``params``: the average of the floating-point parameters; ``n_averaged``: how many
    parameter sets it averages (0: none yet, ``params`` still holds the initial ones)."""

    params: dict[str, torch.Tensor]
    n_averaged: torch.Tensor


def _check(start: int, every: int) -> None:
    for arg, value, low in (("start", start, 0), ("every", every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"swa: {arg} must be an int >= {low}, got {value!r}")


def swa(start: int = 0, *, every: int = 1, name: str = "swa") -> Callback:
    """Keeps ``state.callbacks[name]``: the equal-weight average of the parameters after the
    steps ``start``, ``start + every``, ``start + 2 * every``, ...

    Args:
      start: the first step (the value of ``state.step`` after it) averaged.
      every: steps between averaged ones (``AveragedModel.update_parameters`` called every
        ``every`` steps).
      name: the key of its state in ``state.callbacks``.

    SWA usually runs with a high constant or cyclic learning rate from ``start`` on (torch's
    ``SWALR`` anneals to it); build that with ``fx.optim.join_schedules``, e.g. a cosine decay
    from the base rate to ``swa_lr`` (``cosine_decay_schedule(lr, anneal_steps, alpha=swa_lr /
    lr)``) joined at ``start``. BatchNorm statistics are buffers, not averaged: recompute them
    for the averaged parameters with ``update_bn`` (one pass over training data) before
    evaluating, as torch's ``swa_utils.update_bn`` does.

    Examples:
        Inside the step (on the host, pass it to ``fx.fit``): the average of the parameters
        after steps 2 and 4.

        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(8, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> swa = fx.callbacks.swa(start=2, every=2)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), callbacks=[swa])
        >>> train_step = fx.make_train_step(loss_fn, callbacks=[swa])
        >>> seen = []
        >>> for _ in range(5):
        ...     state, _ = train_step(state, batch)
        ...     seen.append(state.params["weight"].clone())
        >>> average = fx.callbacks.callback_state(state, "swa")
        >>> average.n_averaged, torch.allclose(average.params["weight"], (seen[1] + seen[3]) / 2)
        (tensor(2), True)
        >>> swapped = fx.callbacks.with_swa_params(state)  # for evaluation or export
        >>> torch.equal(swapped.params["weight"], average.params["weight"])
        True
    """
    _check(start, every)

    def init(state):
        params = {k: v.detach().clone() for k, v in state.params.items() if v.is_floating_point()}
        return SWAState(params, torch.zeros((), dtype=torch.int64, device=state.step.device))

    def fn(state, event):
        due = (event.step >= start) & ((event.step - start) % every == 0)
        if due is False:  # a Python step number on the host: nothing to do between updates
            return state, NOTHING
        avg = callback_state(state, name)
        new = {k: _average(v, state.params[k].to(v.dtype), avg.n_averaged)
               for k, v in avg.params.items()}
        n = avg.n_averaged + 1
        if isinstance(due, torch.Tensor):  # a tensor step, inside a compiled step: no branch
            new = {k: torch.where(due, v, avg.params[k]) for k, v in new.items()}
            n = torch.where(due, n, avg.n_averaged)
        return set_callback_state(state, name, SWAState(new, n)), NOTHING

    return Callback(name, init, fn, kinds=("step_end",))


def _average(avg: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``avg + (p - avg) / (n + 1)``, and exactly ``p`` at the first update (``n == 0``), as
    ``AveragedModel`` computes it on the CPU (its CUDA path lerps: the last bit may differ)."""
    return torch.where(n == 0, p, avg + (p - avg) / (n + 1))


def with_swa_params(state, name: str = "swa"):
    """``state`` with the averaged parameters in place of the trained ones.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
        ...                              callbacks=[fx.callbacks.swa()])
        >>> average = fx.callbacks.callback_state(state, "swa")
        >>> average = average.replace(params={"weight": torch.zeros(1, 2), "bias": torch.ones(1)})
        >>> state = fx.callbacks.set_callback_state(state, "swa", average)
        >>> fx.callbacks.with_swa_params(state).params
        {'weight': tensor([[0., 0.]]), 'bias': tensor([1.])}
    """
    return state.replace(params={**state.params, **callback_state(state, name).params})


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def update_bn(state: Any, data: Iterable[Any],
              forward: Callable[[Any, Any], Any] | None = None) -> Any:
    """``state`` with BatchNorm running statistics recomputed for ``state.params`` by one pass
    over ``data`` (``torch.optim.swa_utils.update_bn``: statistics reset, then averaged with
    equal weight over the batches, the module in train mode).

    Args:
      state: a ``TrainState``; usually ``with_swa_params(state)``.
      data: an iterable of batches.
      forward: ``forward(state, batch)`` runs the model; by default
        ``state.apply(state.params, batch[0])`` (or ``batch`` itself when it is a tensor).

    Returns ``state`` unchanged when the model has no BatchNorm with running statistics.

    Examples:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> state = fx.TrainState.create(model, fx.optim.sgd(0.1))
        >>> data = [torch.randn(16, 3) + 5 for _ in range(4)]
        >>> fresh = fx.callbacks.update_bn(state, data)
        >>> int(fresh.buffers["1.num_batches_tracked"]), int(state.buffers["1.num_batches_tracked"])
        (4, 0)
        >>> bool((fresh.buffers["1.running_mean"] != 0).all())  # the trained model's are zeros
        True
    """
    forward = forward or (lambda s, batch: s.apply(s.params, _first(batch)))
    norms = {n: m for n, m in state.module.named_modules()
             if isinstance(m, BatchNorm) and m.track_running_stats}
    if not norms:
        return state
    work = with_step_buffers(state)  # fresh clones that the forward updates in place
    for n in norms:
        prefix = f"{n}." if n else ""
        work.buffers[prefix + "running_mean"].zero_()
        work.buffers[prefix + "running_var"].fill_(1.0)
        work.buffers[prefix + "num_batches_tracked"].zero_()
    momenta = {m: m.momentum for m in norms.values()}
    was = set_training(state.module, True)
    try:
        for m in norms.values():
            m.momentum = None  # a cumulative average over the batches
        with torch.no_grad():
            for batch in data:
                forward(work, batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        set_training(state.module, was)
    return state.replace(buffers=dict(work.buffers))
