"""Pure train and eval steps built on ``torch.func``.

``make_train_step(loss_fn)`` returns ``train_step(state, batch) -> (state, metrics)``: gradients
by ``torch.func.grad_and_value`` (or ``torch.autograd.grad``, see ``fxtrain.step._autodiff``) over
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

from .. import distributed, donation, random
from ._k_steps import check_stacked, unstack
from ._phases import revert_update, single_step
from ._args import StepArgs, step_args
from ._io import BatchGuard, check_batch_device, eval_metrics
from ._spec import StepSpec
from .._torch import traced_settings, vec_isa
from ..protocol import NOTHING, StepState, control_from_metrics, control_to_metrics
from ..state import TrainState, set_training

LossFn = Callable[[TrainState, dict[str, torch.Tensor], Any], Any]
_EVAL_STREAM = 0x5EED


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
        ``loss_scale=fx.precision.loss_scale(...)`` for other settings). ``"fp8"``,
        ``"fp8-rowwise"`` or ``fx.precision.float8(...)``: torchao's float8 linear layers under
        bfloat16 autocast (convert the model first; the step takes ``autodiff="autograd"``).

      autodiff: how the gradients are taken: ``"func"`` (``torch.func.grad_and_value``) or
        ``"autograd"`` (``torch.autograd.grad``, traced into the compiled graph: the step
        turns on ``torch._dynamo.config.trace_autograd_ops`` and
        ``skip_fwd_side_effects_in_bwd_under_checkpoint`` while Dynamo traces it, and puts
        them back after: ``fxtrain._torch.traced_settings``). The two
        give the same gradients; ``"autograd"`` runs the saved-tensor hooks of activation
        checkpointing (``fx.remat``, ``torch.utils.checkpoint``), which ``torch.func``
        refuses (see ``fxtrain.step._autodiff``). ``"auto"`` (the default): ``"autograd"`` for a
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
    return _built(args)


def _choose_cpu_instructions(state: TrainState) -> None:
    """While Dynamo traces a step on torch 2.11 or 2.12: Inductor's choice of the CPU's vector
    instructions, made before it compiles the step with a probe that does not import torch
    (``fxtrain._torch.vec_isa``). Nothing on later torch."""
    if vec_isa.NEEDED:
        vec_isa.pick_for(state.step.device.type)


def _built(args: StepArgs) -> Callable[[TrainState, Any], tuple]:
    """The train step of checked arguments (``make_train_step``)."""
    one_step = single_step(args)
    spec = StepSpec(steps_per_call=args.steps_per_call, precision=args.precision,
                    in_step_callbacks=args.callbacks, step_states=args.step_states,
                    donate=args.donate)

    def donates(asked: bool) -> bool:
        return bool(spec.donate or (spec.donate is None and asked))  # asked: the caller's

    def donated(state: TrainState, new: TrainState, asked: bool) -> TrainState:
        return donation.donate(state, new) if donates(asked) else new

    settings_on, settings_back = traced_settings.scope()  # Dynamo's, for each trace only

    def train_step(state: TrainState, batch: Any, *,
                   donate: bool = False) -> tuple[TrainState, dict[str, torch.Tensor]]:
        donation.check_live(state, "train_step")
        tracing = torch.compiler.is_compiling()  # (eagerly: no setting to change)
        if tracing:
            settings_on()
            _choose_cpu_instructions(state)
        try:
            new, metrics = one_step(state, batch, donates(donate))
        finally:  # (Dynamo runs it where the trace raises an error of fxtrain's or the model's)
            if tracing:
                settings_back()
        return donated(state, new, donate), metrics

    if args.steps_per_call == 1:
        train_step.spec = spec
        return train_step

    def train_steps(state: TrainState, batches: Any, *,
                    donate: bool = False) -> tuple[TrainState, dict[str, torch.Tensor]]:
        donation.check_live(state, "train_step")
        tracing = torch.compiler.is_compiling()
        if tracing:
            settings_on()
            _choose_cpu_instructions(state)
        try:
            check_stacked(batches, args.steps_per_call)
            new, merged = state, NOTHING
            for batch in unstack(batches):  # a Python loop: Dynamo unrolls it into one graph
                new, metrics = one_step(new, batch)
                merged = merged | control_from_metrics(metrics)
            if args.callbacks:
                metrics.update(control_to_metrics(merged, metrics["loss"].device))
        finally:
            if tracing:
                settings_back()
        return donated(state, new, donate), metrics

    train_steps.spec = spec
    return train_steps


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
    settings_on, settings_back = traced_settings.scope()  # labels= (transformers' logging)

    def eval_step(state: TrainState, batch: Any) -> dict[str, Any]:
        donation.check_live(state, "eval_step")
        tracing = torch.compiler.is_compiling()
        if tracing:
            settings_on()
            _choose_cpu_instructions(state)
        was = None
        try:
            guard(batch)
            check_batch_device(batch, state.step.device, "eval_step")
            key = random.fold_in(random.step_key(state.rng, state.step), _EVAL_STREAM)
            context = state.layout.context
            if context is not None:  # this rank's slice of every sequence, as a train step's
                batch = distributed.context_sliced(batch, context.size, context.rank)
            was = set_training(state.module, False)
            with torch.no_grad(), random.keyed(key):
                out = metrics_fn(state, state.params, batch) if takes_params else \
                    metrics_fn(state, batch)
        finally:
            if was is not None:
                set_training(state.module, was)
            if tracing:
                settings_back()
        return eval_metrics(out)

    return eval_step
