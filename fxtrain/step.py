"""Pure train and eval steps built on ``torch.func``.

``make_train_step(loss_fn)`` returns ``train_step(state, batch) -> (state, metrics)``: gradients
by ``torch.func.grad_and_value`` (or ``torch.autograd.grad``, see ``fxtrain.gradients``) over
``state.apply`` (``functional_call``), the update by the
functional optimizer, randomness from ``state.rng`` and the step counter. It compiles as is with
``torch.compile(train_step, fullgraph=True)``: one graph, no recompiles, no host syncs.

Errors in a compiled step reach you wrapped by Dynamo, with fxtrain's message inside; call the
step once without compiling to see them plain.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import distributed, donation, gradients, random, sharding
from .protocol import (NOTHING, Event, StepState, callback_state, control_from_metrics,
                       control_to_metrics, fold, set_callback_state)
from ._k_steps import check_stacked, unstack
from .optim.wrappers import learning_rate
from .precision import LOSS_SCALE
from .state import TrainState, set_training, with_step_buffers
from ._step_args import StepArgs, step_args
from ._step_io import (BatchGuard, check_batch_device, check_no_checkpointing, eval_metrics,
                       split_loss)
from ._step_spec import StepSpec
from .stats import gradient_histograms, gradient_statistics
from ._torch import autograd as torch_autograd
from ._torch.traced_errors import fail
from ._torch.dynamo import ignore_transformers_logging
from .tree import squared_norms, tree_select

LossFn = Callable[[TrainState, dict[str, torch.Tensor], Any], Any]
_EVAL_STREAM = 0x5EED


def _step_metrics(loss, aux, grads, opt_state, grad_stats,
                  squared: list | None = None) -> dict[str, torch.Tensor]:
    squared = squared_norms(list(grads.values())) if squared is None else squared
    metrics = {"loss": loss, "grad_norm": torch.sqrt(sum(squared))}
    lr = learning_rate(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    if grad_stats:
        metrics.update(gradient_statistics(grads, squared))
    if grad_stats == "histograms":  # of a sharded state's whole gradients (a gather)
        metrics.update(gradient_histograms(sharding.gathered(grads)))
    clash = sorted(metrics.keys() & aux.keys())
    if clash:
        fail(ValueError, f"loss_fn's aux uses reserved metric names {clash}; rename them")
    return {**metrics, **aux}


def revert_update(old: TrainState, new: TrainState, skip: Any) -> TrainState:
    """``new`` with the params, buffers and optimizer state of ``old`` where ``skip`` holds.

    ``skip`` is a Python bool (decided on the host) or a 0-d bool tensor (no sync).

    Examples:
        >>> from fxtrain.step import revert_update
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
    return new.replace(params=tree_select(skip, old.params, new.params),
                       buffers=tree_select(skip, old.buffers, new.buffers),
                       opt_state=tree_select(skip, old.opt_state, new.opt_state))


def make_train_step(loss_fn: LossFn, *, callbacks: Sequence[Callable] = (),
                    loss_scale: StepState | None = None,
                    grad_stats: bool | str = False, data_parallel: bool | None = None,
                    buffers: str = "mean", donate: bool | None = None,
                    steps_per_call: int = 1, precision: str = "32",
                    autodiff: str = "auto") -> Callable[[TrainState, Any], tuple]:
    """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(state, params, batch) -> loss`` or ``(loss, aux)``; ``loss`` a 0-d
        float tensor, or an ``fx.losses.Mean`` (a sum and what it averages over: micro-batches
        and ranks then weigh by it, see ``fx.losses``), ``aux`` a dict of 0-d tensors reported
        as metrics. Run the model with ``state.apply(params, inputs)``.
      callbacks: tensor-only callbacks folded on a "step_end" event inside the step; their
        merged control comes back as metrics ``control/stop`` etc. (0-d bool tensors), and a
        ``skip`` control discards the step's update. Callbacks that do IO are refused. Their
        states must be in the state: ``fx.fit`` adds the missing ones; in your own loop pass
        them to ``TrainState.create(..., callbacks=...)`` or ``fx.callbacks.init``. A loss
        scale among them (``fx.precision.loss_scale(...)``) is taken as ``loss_scale``, as
        before that keyword existed (an alias, kept working).
      loss_scale: ``"16-mixed"``'s dynamic loss scale, ``fx.precision.loss_scale(...)`` for
        settings other than the default one the step owns otherwise; its state is
        ``state.callbacks["loss_scale"]``. Refused for any other precision.
      grad_stats: True also reports per-parameter gradient norms (``grad_norm/<name>``) and
        their max/min/mean (turned on when a callback such as ``grad_monitor`` needs them);
        ``"histograms"`` adds per-parameter gradient histograms (``grad_hist/<name>``, see
        ``gradient_histograms``) for ``model_watch``. They cost a pass over the gradients per
        step (about 10% of a tiny MLP's step on CPU, little on larger models).
      data_parallel: average gradients over the ranks of the process group inside the step
        (functional collectives: it still compiles into one graph). None: on when a process
        group with more than one rank is initialized when the step is built. The loss and
        aux metrics are averaged too, so every rank logs and decides alike.
      buffers: under data parallelism, ``"mean"`` averages floating-point buffers (BatchNorm
        running statistics) over ranks after each step, so the state stays the same on every
        rank and any rank's checkpoint is the run's; ``"local"`` keeps each rank's own (rank
        0's are the ones checkpointed).
      donate: True writes the new state into the given state's storage and marks the given
        state donated (see ``fxtrain.donation``); None donates when its caller passes
        ``train_step(state, batch, donate=True)``, as ``fx.fit`` does; False never donates.
      steps_per_call: K > 1 makes a step that takes K stacked batches (every leaf with a
        leading dimension K, as ``torch.stack`` of K batches gives) and takes K single steps
        on them in one call, unrolled into one compiled graph: each inner step keys its
        randomness on its own step number and folds the in-step callbacks (a skip undoes that
        inner step only), so K steps per call give exactly the state of K calls of the
        single step. It returns the state after K steps and the metrics of the last one, its
        ``control/*`` flags OR-ed over the K steps. ``fx.fit`` reads K from the step's
        ``fx.step_spec`` (compiled or not) and feeds it K batches per call (see ``fx.fit``).

      precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"bf16-true"``, as Lightning
        names them (see ``fxtrain.precision``): autocast for the forward and backward, float32
        master parameters and optimizer state, and for ``"16-mixed"`` dynamic loss scaling
        whose state is ``state.callbacks["loss_scale"]`` (``fx.fit`` creates it; pass
        ``loss_scale=fx.precision.loss_scale(...)`` for other settings).

      autodiff: how the gradients are taken: ``"func"`` (``torch.func.grad_and_value``) or
        ``"autograd"`` (``torch.autograd.grad``, traced into the compiled graph: a step that
        takes it turns on ``torch._dynamo.config.trace_autograd_ops`` and
        ``skip_fwd_side_effects_in_bwd_under_checkpoint``, process-wide settings). The two
        give the same gradients; ``"autograd"`` runs the saved-tensor hooks of activation
        checkpointing (``fx.remat``, ``torch.utils.checkpoint``), which ``torch.func``
        refuses (see ``fxtrain.gradients``). ``"auto"`` (the default): ``"autograd"`` for a
        state whose model needs it (sharded per block by ``fx.shard``, or with its own
        activation checkpointing on, as transformers' ``gradient_checkpointing_enable()``),
        ``"func"`` otherwise; ``fx.remat`` inside ``loss_fn`` needs ``"autograd"`` named.

    Returns:
      ``train_step(state, batch, *, donate=False)``, with how it was built in
      ``fx.step_spec(train_step)``; metrics hold ``loss``, ``grad_norm``, ``learning_rate``
      (when the optimizer records one), ``loss_scale`` under ``"16-mixed"``, ``loss_count``
      when ``loss_fn`` returns an ``fx.losses.Mean`` (what the loss averages over, all ranks'),
      and the aux values, all 0-d tensors.

    Examples:
        >>> import torch.nn.functional as F
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     logits = state.apply(params, x)
        ...     accuracy = (logits.argmax(-1) == y).float().mean()
        ...     return F.cross_entropy(logits, y), {"accuracy": accuracy}  # (loss, aux)
        >>> x = torch.randn(8, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> state = fx.TrainState.create(nn.Linear(2, 2), fx.optim.adam(0.1))
        >>> train_step = fx.make_train_step(loss_fn)  # then torch.compile(..., fullgraph=True)
        >>> state, first = train_step(state, (x, y))
        >>> for _ in range(4):
        ...     state, metrics = train_step(state, (x, y))
        >>> sorted(metrics), int(state.step)
        (['accuracy', 'grad_norm', 'learning_rate', 'loss'], 5)
        >>> metrics["loss"].shape, bool(metrics["loss"] < first["loss"])  # 0-d tensors
        (torch.Size([]), True)

        In-step callbacks (their states created with the state) report their merged control:

        >>> guard = fx.callbacks.nan_guard()
        >>> state = fx.TrainState.create(nn.Linear(2, 2), fx.optim.adam(0.1), callbacks=[guard])
        >>> state, metrics = fx.make_train_step(loss_fn, callbacks=[guard])(state, (x, y))
        >>> {k: v for k, v in metrics.items() if k.startswith("control/")}
        {'control/stop': tensor(False), 'control/save': tensor(False),
         'control/evaluate': tensor(False), 'control/log': tensor(False)}
    """
    args = step_args(loss_fn, callbacks=callbacks, loss_scale=loss_scale,
                     grad_stats=grad_stats, data_parallel=data_parallel, buffers=buffers,
                     donate=donate, steps_per_call=steps_per_call, precision=precision,
                     autodiff=autodiff)  # every argument checked before anything is built
    if args.autodiff == "autograd":
        torch_autograd.trace_autograd_ops()  # process-wide: see fxtrain._torch.autograd
    ignore_transformers_logging()  # process-wide: see fxtrain._torch.dynamo
    return _built(args)


def _built(args: StepArgs) -> Callable[[TrainState, Any], tuple]:
    """The train step of checked arguments (``make_train_step``)."""
    one_step = _single_step(args)
    spec = StepSpec(steps_per_call=args.steps_per_call, precision=args.precision,
                    in_step_callbacks=args.callbacks, step_states=args.step_states,
                    donate=args.donate)

    def donated(state: TrainState, new: TrainState, asked: bool) -> TrainState:
        if spec.donate or (spec.donate is None and asked):  # asked: the caller's donate=
            return donation.donate(state, new)
        return new

    def train_step(state: TrainState, batch: Any, *,
                   donate: bool = False) -> tuple[TrainState, dict[str, torch.Tensor]]:
        donation.check_live(state, "train_step")
        new, metrics = one_step(state, batch)
        return donated(state, new, donate), metrics

    if args.steps_per_call == 1:
        train_step.spec = spec
        return train_step

    def train_steps(state: TrainState, batches: Any, *,
                    donate: bool = False) -> tuple[TrainState, dict[str, torch.Tensor]]:
        donation.check_live(state, "train_step")
        check_stacked(batches, args.steps_per_call)
        new, merged = state, NOTHING
        for batch in unstack(batches):  # a Python loop: Dynamo unrolls it into one graph
            new, metrics = one_step(new, batch)
            merged = merged | control_from_metrics(metrics)
        if args.callbacks:
            metrics.update(control_to_metrics(merged, metrics["loss"].device))
        return donated(state, new, donate), metrics

    train_steps.spec = spec
    return train_steps


def _single_step(args: StepArgs) -> Callable[[TrainState, Any], tuple]:
    """``one_step(state, batch) -> (state, metrics)``: one update, never donating."""
    loss_fn, mixed, callbacks = args.loss_fn, args.mixed, args.callbacks
    guard = BatchGuard("train_step")
    choose = gradients.chooser(args.parallel, args.buffers == "mean")
    rank = distributed.data_rank() if args.parallel else 0  # a tensor-parallel group's alike

    def one_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        mixed.check(state.params)
        guard(batch)
        check_batch_device(batch, state.step.device, "train_step")
        autodiff = gradients.resolved(args.autodiff, state.module)  # "auto": by the model
        if autodiff == "func":
            check_no_checkpointing(state.module)
        elif args.autodiff == "auto":  # the Dynamo settings an autograd step needs
            torch_autograd.trace_autograd_ops_now()
        scaler = callback_state(state, LOSS_SCALE) if mixed.scaled else None
        path = choose(state.params, autodiff, state.module)  # one process, data parallel,
        # sharded or tensor parallel
        if isinstance(path, gradients.Sharded) and args.data_parallel is False:
            raise ValueError("make_train_step(data_parallel=False) cannot train a sharded state "
                             "(fx.shard): sharding is data parallel, each rank on its share of "
                             "the batch; leave data_parallel unset")
        key = random.step_key(state.rng, state.step)
        if rank:  # each rank draws its own dropout masks (rank 0 draws a single process's)
            key = random.fold_in(key, rank)

        def forward(params):
            inner = with_step_buffers(state)
            with mixed.autocast(state.step.device):
                loss, aux, count = split_loss(loss_fn(inner, params, batch))
            if mixed.compute_dtype is not None:
                loss = loss.float()  # the loss and its metric in float32
            loss, weight = _weighed(loss, count, args.parallel)
            scaled = loss if scaler is None else loss * scaler.scale
            weights = () if weight is None else (weight,)  # functorch's aux: tensors only
            return scaled, (loss, aux, dict(inner.buffers or {}), weights)  # plain dicts

        def in_train_mode_keyed(fn, *inputs):
            was = set_training(state.module, True)
            try:
                with random.keyed(key, autodiff):
                    return fn(*inputs)
            finally:
                set_training(state.module, was)

        whole = path.whole(state.params, state.module)
        recompute = path.recomputes(state.module)
        if autodiff == "func":  # the transform runs the forward in train mode, keyed
            grads, (_, (loss, aux, new_buffers, weights)) = gradients.differentiate(
                lambda params: in_train_mode_keyed(forward, params), autodiff,
                recompute=recompute)(whole)
        else:  # and the backward: what activation checkpointing recomputes there runs as
            # the forward ran (see fxtrain.gradients, fxtrain.random and fx.remat)
            grads, (_, (loss, aux, new_buffers, weights)) = in_train_mode_keyed(
                gradients.differentiate(forward, autodiff, path.on_grad, recompute), whole)
        weight = weights[0] if weights else None
        out = path.reduce(grads, loss, aux, new_buffers, state.params,
                          scale=None if scaler is None else scaler.scale,
                          check_finite=scaler is not None)
        new = state.apply_gradients(out.grads, weight=weight).replace(
            buffers=out.buffers or None)
        metrics = path.metrics(_step_metrics(out.loss, out.aux, out.grads, new.opt_state,
                                             args.grad_stats, out.squared))
        if weight is not None:  # what the loss averaged over, on every rank: see fx.losses
            metrics["loss_count"] = weight
        if scaler is not None:  # a non-finite step is skipped, and the scale follows
            new = revert_update(state, new, ~out.finite)
            new = set_callback_state(new, LOSS_SCALE, scaler.update(out.finite))
            metrics["loss_scale"] = scaler.scale
        if callbacks:
            new, control = fold(callbacks, new, Event("step_end", new.step, None, metrics))
            if control.stop_epoch is not False or control.abort is not False:
                fail(ValueError, "an in-step callback asked for stop_epoch or abort, which only "
                                 "host callbacks can ask for (fx.fit reads them at once); pass "
                                 "it to fit(callbacks=...)")
            new = revert_update(state, new, control.skip)
            metrics.update(control_to_metrics(control, loss.device))
        return new, metrics

    return one_step


def _weighed(loss: torch.Tensor, count: torch.Tensor | None,
             parallel: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    return loss * share, mean * distributed.data_world_size()


def make_eval_step(metrics_fn: Callable) -> Callable[[TrainState, Any], dict[str, Any]]:
    """Builds the pure ``eval_step(state, batch) -> metrics``.

    ``metrics_fn(state, params, batch)`` (so a ``loss_fn`` can be reused) or
    ``metrics_fn(state, batch)`` returns a dict of metrics, a 0-d loss, or ``(loss, aux)``.
    The module runs in eval mode, without gradients, with randomness keyed on the state.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = state.replace(params={"weight": torch.tensor([[1.0, 1.0]]),
        ...                               "bias": torch.tensor([0.0])})
        >>> batch = (torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0], [6.0]]))
        >>> fx.make_eval_step(loss_fn)(state, batch)  # reuses the loss_fn: {"loss": ...}
        {'loss': tensor(0.5000)}
        >>> def metrics_fn(state, batch):  # or a dict of metrics
        ...     x, y = batch
        ...     error = (state.apply(state.params, x) - y).abs()
        ...     return {"mae": error.mean(), "max_error": error.max()}
        >>> eval_step = fx.make_eval_step(metrics_fn)
        >>> eval_step(state, batch)
        {'mae': tensor(0.5000), 'max_error': tensor(1.)}
        >>> fx.evaluate(eval_step, state, [batch, batch])  # averaged over batches
        {'mae': tensor(0.5000), 'max_error': tensor(1.)}
    """
    takes_params = len(inspect.signature(metrics_fn).parameters) >= 3
    guard = BatchGuard("eval_step")
    ignore_transformers_logging()  # labels= under a compiled eval step too

    def eval_step(state: TrainState, batch: Any) -> dict[str, Any]:
        donation.check_live(state, "eval_step")
        guard(batch)
        check_batch_device(batch, state.step.device, "eval_step")
        key = random.fold_in(random.step_key(state.rng, state.step), _EVAL_STREAM)
        was = set_training(state.module, False)
        try:
            with torch.no_grad(), random.keyed(key):
                out = metrics_fn(state, state.params, batch) if takes_params else \
                    metrics_fn(state, batch)
        finally:
            set_training(state.module, was)
        return eval_metrics(out)

    return eval_step
