"""One update of a train step, in named phases: the inputs checked, the path and the update
planned from the state's layout, the batch's gradients taken, reduced over the ranks, applied,
scaled and folded.

``single_step(args)`` is ``one_step(state, batch) -> (state, metrics)`` (``make_train_step``
builds on it): each phase below is a function of values, and ``one_step`` reads as their
sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from .. import distributed, random
from . import _autodiff, _updates
from ._args import StepArgs
from ._io import BatchGuard, check_batch_device, check_no_checkpointing, split_loss
from .._torch.traced_errors import fail
from ..optim.wrappers import learning_rate
from ..precision import LOSS_SCALE
from ..protocol import Event, callback_state, control_to_metrics, fold, set_callback_state
from ..state import TrainState, set_training, with_step_buffers
from ..stats import gradient_histograms, gradient_statistics
from ..tree import squared_norms, tree_select


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this step trains a state of its layout: ``autodiff`` resolved, the gradient ``path``
    (one process, data parallel, sharded, tensor parallel), whether it averages over data
    replicas (``parallel``), the data ``rank`` its dropout masks are keyed on, and the
    ``update`` strategy that applies the reduced gradients (``_updates``)."""

    autodiff: str
    path: Any
    parallel: bool
    rank: int
    update: Callable[..., tuple]


@dataclasses.dataclass(frozen=True)
class Gradients:
    """The gradients of one batch with the loss they are of (unscaled, float32), the aux
    metrics, the buffers the forward left, and the weight of the gradient (the items the loss
    averages over: ``fx.losses.Mean``; None for a plain loss)."""

    grads: dict[str, torch.Tensor]
    loss: torch.Tensor
    aux: dict[str, Any]
    buffers: dict[str, torch.Tensor]
    weight: torch.Tensor | None


def checked(args: StepArgs, guard: BatchGuard, state: TrainState, batch: Any) -> None:
    """Refuses a state or batch this step cannot train: parameters or a module of another
    precision than the policy's, a batch of another structure than the first one's (``guard``)
    or on another device than the state."""
    args.mixed.check(state.params)
    args.mixed.check_module(state.module, state.step.device)
    guard(batch)
    check_batch_device(batch, state.step.device, "train_step")


def planned(args: StepArgs, state: TrainState, donating: bool) -> Plan:
    """The step's ``Plan`` for ``state`` (a lookup, made while the step is traced): the gradient
    path from its layout, and the update from the layout, the transformation, donation (the
    caller gives ``state`` up: ``fxtrain.donation``) and whether the step is being compiled."""
    layout = state.layout
    autodiff = _autodiff.resolved(args.autodiff, layout)  # "auto": by the layout
    if autodiff == "func":
        check_no_checkpointing(layout)
    args.mixed.check_autodiff(state.module, autodiff)
    path = distributed.strategy(layout, autodiff, args.parallel, args.buffers == "mean")
    if isinstance(path, distributed.Sharded) and args.data_parallel is False:
        fail(ValueError, "make_train_step(data_parallel=False) cannot train a sharded state "
                         "(fx.shard): sharding is data parallel, each rank on its share of the "
                         "batch; leave data_parallel unset")
    parallel = args.parallel and layout.gradient_world_size() > 1
    # an update that writes over the given-up state only where nothing can revert it
    donates = donating and not args.mixed.scaled and len(args.callbacks) == 0
    update = _updates.chosen(state, autodiff, donates, torch.compiler.is_compiling())
    return Plan(autodiff, path, parallel, layout.data_rank() if parallel else 0, update)


def step_key(state: TrainState, plan: Plan) -> torch.Tensor:
    """The key of this step's randomness: each data replica draws its own dropout masks (rank
    0 draws a single process's; a tensor-parallel group's ranks alike)."""
    key = random.step_key(state.rng, state.step)
    return random.fold_in(key, plan.rank) if plan.rank else key


def gradient_fn(args: StepArgs, state: TrainState, batch: Any, plan: Plan, key: torch.Tensor,
                scale: torch.Tensor | None) -> Callable[[dict], tuple]:
    """``params -> (grads, (scaled loss, (loss, aux, buffers, weights)))`` of the batch (read
    into ``Gradients`` by ``taken``): the forward (and, on autograd's path, the backward, where
    checkpointed regions rerun as the forward ran) in train mode, keyed on ``key``. Returned,
    not called: the step calls it, so a graph break in ``loss_fn`` splits as few frames as it
    can (``fx.debug.explain_step``)."""

    context = state.layout.context
    if context is not None:  # this rank's slice of every sequence (fxtrain.distributed._context)
        batch = distributed.context_sliced(batch, context.size, context.rank)

    def forward(params):
        inner = with_step_buffers(state)
        with args.mixed.autocast(state.step.device):
            loss, aux, count = split_loss(args.loss_fn(inner, params, batch))
        if args.mixed.compute_dtype is not None:
            loss = loss.float()  # the loss and its metric in float32
        loss, weight = weighed(loss, count, plan.parallel, state.layout)
        weights = () if weight is None else (weight,)  # functorch's aux: tensors only
        scaled = loss if scale is None else loss * scale
        written = {k: v for k, v in (inner.buffers or {}).items()  # plain dicts; the frozen
                   if k not in state.layout.frozen}              # parameters, never written
        return scaled, (loss, aux, written, weights)

    def keyed(fn, *inputs):
        was = set_training(state.module, True)
        try:
            with random.keyed(key, plan.autodiff, context and (context.size, context.rank)):
                return fn(*inputs)
        finally:
            set_training(state.module, was)

    recompute = plan.path.recomputes()
    if plan.autodiff == "func":  # the transform runs the forward in train mode, keyed
        return _autodiff.differentiate(functools.partial(keyed, forward), "func",
                                       recompute=recompute)
    # autograd: the backward too, so what activation checkpointing reruns runs as the forward
    return _autodiff.differentiate(forward, "autograd", plan.path.on_grad, recompute,
                                   reused=bool(state.layout.regions), around=keyed)


def taken(result: tuple) -> Gradients:
    """``gradient_fn``'s result as ``Gradients``."""
    grads, (_, (loss, aux, buffers, weights)) = result
    return Gradients(grads, loss, aux, buffers, weights[0] if weights else None)


def weighed(loss: torch.Tensor, count: torch.Tensor | None, parallel: bool,
            layout: distributed.Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss to differentiate and report, and the weight of this step's gradient
    (``fx.losses``): None for a plain loss. Across ranks each rank's loss is scaled by its count
    over the ranks' mean count, so the ranks' mean (of gradients, of the loss) weighs every
    rank's items alike; the weight is then the count summed over the ranks."""
    if count is None:
        return loss, None
    count = count.detach().to(torch.float32)
    if not parallel:
        return loss, count
    mean = distributed.mean_in_step([count])[0]
    share = torch.where(mean > 0, count / mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return loss * share, mean * layout.gradient_world_size()


def applied(args: StepArgs, state: TrainState, plan: Plan, out: Any,
            weight: torch.Tensor | None) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The reduced gradients ``out`` applied by the plan's update: the new state and the
    step's metrics."""
    new, squared = plan.update(state, out.grads, weight)
    if state.buffers is not None:  # in their order, the frozen parameters as they were
        new = new.replace(buffers={k: out.buffers.get(k, v) for k, v in state.buffers.items()})
    squared = out.squared if out.squared is not None else squared
    metrics = plan.path.metrics(step_metrics(out.loss, out.aux, out.grads, new.opt_state,
                                             args.grad_stats, squared))
    if weight is not None:  # what the loss averaged over, on every rank: see fx.losses
        metrics["loss_count"] = weight
    return new, metrics


def step_metrics(loss, aux, grads, opt_state, grad_stats,
                 squared: list | None = None) -> dict[str, torch.Tensor]:
    """``loss``, ``grad_norm``, ``learning_rate`` (where the optimizer records one), the
    gradient statistics asked for, and ``aux``."""
    squared = squared_norms(list(grads.values())) if squared is None else squared
    metrics = {"loss": loss, "grad_norm": torch.sqrt(sum(squared))}
    lr = learning_rate(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr.to(loss.device)  # from an offloaded state: the host
    if grad_stats:
        metrics.update(gradient_statistics(grads, squared))
    if grad_stats == "histograms":  # of a sharded state's whole gradients (a gather)
        metrics.update(gradient_histograms(distributed.gathered(grads)))
    clash = sorted(metrics.keys() & aux.keys())
    if clash:
        fail(ValueError, f"loss_fn's aux uses reserved metric names {clash}; rename them")
    return {**metrics, **aux}


def loss_scaled(state: TrainState, new: TrainState, metrics: dict, scaler: Any,
                finite: torch.Tensor) -> TrainState:
    """``"16-mixed"``: a step with a non-finite gradient skipped, and the scale following."""
    new = revert_update(state, new, ~finite)
    metrics["loss_scale"] = scaler.scale
    return set_callback_state(new, LOSS_SCALE, scaler.update(finite))


def folded(callbacks: tuple, state: TrainState, new: TrainState,
           metrics: dict) -> TrainState:
    """The in-step callbacks folded on a "step_end" event: a ``skip`` undoes the update, the
    merged control goes into ``metrics``."""
    new, control = fold(callbacks, new, Event("step_end", new.step, None, metrics))
    if control.stop_epoch is not False or control.abort is not False:
        fail(ValueError, "an in-step callback asked for stop_epoch or abort, which only host "
                         "callbacks can ask for (fx.fit reads them at once); pass it to "
                         "fit(callbacks=...)")
    metrics.update(control_to_metrics(control, metrics["loss"].device))
    return revert_update(state, new, control.skip)


def revert_update(old: TrainState, new: TrainState, skip: Any) -> TrainState:
    """``new`` with the params, buffers and optimizer state of ``old`` where ``skip`` holds.

    ``skip`` is a Python bool (decided on the host) or a 0-d bool tensor (no sync).

    Examples:
        >>> from fxtrain.step._steps import revert_update
        >>> old = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> grads = {k: torch.ones_like(p) for k, p in old.params.items()}
        >>> new = old.apply_gradients(grads)
        >>> kept = revert_update(old, new, torch.tensor(True))  # decided on device
        >>> torch.equal(kept.params["bias"], old.params["bias"]), int(kept.step)  # step counts
        (True, 1)
        >>> torch.equal(revert_update(old, new, False).params["bias"], new.params["bias"])
        True
    """
    if skip is False:
        return new
    if skip is True:
        return new.replace(params=old.params, buffers=old.buffers, opt_state=old.opt_state)
    # an offloaded optimizer state chooses on the host, where it lives (one small copy)
    on_host = skip if old.layout.offload is None else distributed.to_host(skip, pinned=False)
    return new.replace(params=tree_select(skip, old.params, new.params),
                       buffers=tree_select(skip, old.buffers, new.buffers),
                       opt_state=tree_select(on_host, old.opt_state, new.opt_state))


def single_step(args: StepArgs) -> Callable[..., tuple]:
    """``one_step(state, batch, donating=False) -> (state, metrics)``: one update, its phases
    in order. ``donating``: the caller gives ``state`` up after it (``fxtrain.donation``), so
    an eager update that nothing can revert writes into ``state``'s storage
    (``_updates.donating``)."""
    guard = BatchGuard("train_step")

    def one_step(state: TrainState, batch: Any,
                 donating: bool = False) -> tuple[TrainState, dict[str, torch.Tensor]]:
        checked(args, guard, state, batch)
        plan = planned(args, state, donating)
        scaler = callback_state(state, LOSS_SCALE) if args.mixed.scaled else None
        scale = None if scaler is None else scaler.scale
        take = gradient_fn(args, state, batch, plan, step_key(state, plan), scale)
        took = taken(take(plan.path.whole(state.params)))
        out = plan.path.reduce(took.grads, took.loss, took.aux, took.buffers, state.params,
                               scale=scale, check_finite=scaler is not None)
        weight = took.weight
        del took  # eager: the gradients as the backward left them go before the update
        new, metrics = applied(args, state, plan, out, weight)
        if scaler is not None:
            new = loss_scaled(state, new, metrics, scaler, out.finite)
        if args.callbacks:
            new = folded(args.callbacks, state, new, metrics)
        return new, metrics

    return one_step
