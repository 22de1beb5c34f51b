"""A ``fit`` call's two values: its plan, what was asked (frozen before the first step), and its
progress, where the run stands (the one mutable value of the loop, moved by ``fxtrain.loop._fit``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..data._batches import length_of
from ..data._feed import Feed
from ._flags import PendingFlags
from ..metrics._means import Means
from ..protocol import Callback, takes_step_end
from ..step._spec import StepSpec


def check_fit_args(*, max_steps: Any, max_epochs: Any, eval_step: Any, eval_data: Any,
                   eval_every: Any, sync_every: Any) -> None:
    """Refuses ``fit``'s settings that cannot run, before anything is read or built."""
    for label, value in (("max_steps", max_steps), ("max_epochs", max_epochs),
                         ("eval_every", eval_every), ("sync_every", sync_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fit: {label} must be a positive int or None, got {value!r}")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: eval_step and eval_data go together; pass both or neither")
    if eval_every is not None and eval_step is None:
        raise ValueError("fit: eval_every needs eval_step and eval_data")
    if isinstance(eval_data, Mapping):
        check_sets(eval_data)
    if isinstance(eval_step, Mapping) and (not isinstance(eval_data, Mapping)
                                           or set(eval_step) != set(eval_data)):
        raise ValueError(f"fit: an eval_step dict gives each evaluation set its step, so its keys "
                         f"must be eval_data's sets; got eval_step "
                         f"{list(eval_step)} for eval_data "
                         f"{list(eval_data) if isinstance(eval_data, Mapping) else 'batches'}")


def check_sets(eval_data: Mapping) -> None:
    """Refuses an ``eval_data`` dict whose keys cannot name evaluation sets (``<set>/<metric>``)
    or whose values are not batches."""
    if not eval_data:
        raise ValueError("fit: eval_data is an empty dict; give it at least one evaluation set "
                         "({'val': batches}), or pass eval_data=None for no evaluation")
    for name, data in eval_data.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"fit: eval_data's keys name the evaluation sets and must be "
                            f"non-empty strings; got {name!r} ({type(name).__name__})")
        if "/" in name:
            raise ValueError(f"fit: evaluation set {name!r} has a '/' in its name; its metrics "
                             f"are named '<set>/<metric>', so a set's name has none (e.g. "
                             f"{name.replace('/', '_')!r})")
        if isinstance(data, Mapping | torch.Tensor) or data is None:
            raise TypeError(f"fit: evaluation set {name!r} is {type(data).__name__}, not "
                            "batches; eval_data={'val': batches, ...} maps each set's name to "
                            "its batches (fx.data.Batches, a DataLoader or a list of batches)")


def eval_sets(eval_data: Any) -> list[str] | None:
    """The names of ``eval_data``'s evaluation sets when it is a dict of them, else None."""
    return list(eval_data) if isinstance(eval_data, Mapping) else None


def evaluations(eval_step: Any, eval_data: Any) -> tuple[tuple[str | None, Callable, Any], ...]:
    """``fit``'s evaluations as ``(set, eval step, batches)``: one per set of an ``eval_data``
    dict, in its order, or one unnamed (``None``) for plain batches; none without evaluation.

    Examples:
        >>> from fxtrain.loop._run import evaluations
        >>> step = lambda state, batch: {"loss": batch.mean()}
        >>> [name for name, _, _ in evaluations(step, {"val": [], "test": []})]
        ['val', 'test']
        >>> [name for name, _, _ in evaluations(step, [])]
        [None]
    """
    if eval_data is None:
        return ()
    if not isinstance(eval_data, Mapping):
        return ((None, eval_step, eval_data),)
    return tuple((name, eval_step[name] if isinstance(eval_step, Mapping) else eval_step, data)
                 for name, data in eval_data.items())


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a ``fit`` call was asked to do (see ``fit`` for each setting).

    Attributes:
      run_step: ``run_step(state, batches, position) -> (state, metrics)``: the train step as
        ``fit`` calls it (``fxtrain.step._call``).
      stream: the data, as a stream with a position in the state.
      callbacks: the host callbacks, folded after every event.
      spec: the step's ``StepSpec``.
      donates: whether each call gives the step its state (no host callback may skip).
      max_steps, max_epochs, eval_every, sync_every: when the run stops, evaluates and reads
        its control flags.
      checkpoint: the ``CheckpointManager``, or None.
      eval_step, eval_data: the evaluation, or None; ``eval_data`` a dict for several sets.
      evaluations: ``(set, eval step, batches)`` per evaluation set (``evaluations``).
    """

    run_step: Callable
    stream: Any
    callbacks: tuple
    spec: StepSpec
    donates: bool
    max_steps: int | None
    max_epochs: int | None
    eval_every: int | None
    sync_every: int
    checkpoint: Any
    eval_step: Callable | None
    eval_data: Any
    evaluations: tuple = dataclasses.field(init=False)  # (set, eval step, batches) per set
    k: int = dataclasses.field(init=False)  # the steps one call takes (spec.steps_per_call)
    all_callbacks: tuple = dataclasses.field(init=False)  # in-step ones too: vetoes, reasons
    before_step: tuple = dataclasses.field(init=False)  # host callbacks of step_begin
    per_eval_batch: tuple = dataclasses.field(init=False)  # of eval_batch
    at_step_end: tuple = dataclasses.field(init=False)  # of step_end (no fold without them)

    def __post_init__(self):
        def of(kind: str) -> tuple:
            return tuple(cb for cb in self.callbacks
                         if isinstance(cb, Callback) and kind in cb.kinds)

        derived = {"evaluations": evaluations(self.eval_step, self.eval_data),
                   "k": self.spec.steps_per_call,
                   "all_callbacks": (*self.spec.in_step_callbacks, *self.callbacks),
                   "before_step": of("step_begin"), "per_eval_batch": of("eval_batch"),
                   "at_step_end": tuple(cb for cb in self.callbacks if takes_step_end(cb))}
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def limit(self, step: int, epoch: int) -> str | None:
        """Why the run ends at ``step`` and ``epoch``, or None."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return "max_epochs"
        return None

    def announced(self) -> dict[str, Any]:
        """What setup and train_begin tell the callbacks about the run."""
        spec = self.spec
        return {"max_steps": self.max_steps, "max_epochs": self.max_epochs,
                "steps_per_epoch": length_of(self.stream), "batch_size": self.stream.batch_size,
                "eval_batches": self._eval_batches(),
                "compiled": spec.compiled, "sync_every": self.sync_every,
                "steps_per_call": spec.steps_per_call,
                **({} if spec.precision == "32" else {"precision": spec.precision}),
                **({"cuda_graphs": True} if spec.cuda_graphs else {}),
                **({"eval_sets": eval_sets(self.eval_data)} if isinstance(self.eval_data,
                                                                          Mapping) else {})}

    def _eval_batches(self) -> int | None:
        """The batches of one evaluation, over all its sets (None: some set has no length)."""
        lengths = [length_of(data) for _, _, data in self.evaluations]
        if not lengths or None in lengths:
            return None
        return sum(lengths)


@dataclasses.dataclass(slots=True)
class Progress:
    """Where a ``fit`` call stands.

    Attributes:
      state: the state now.
      step, epoch: ``int(state.step)`` and the epoch being trained, on the host.
      feed: the batches on their way to the device (one call ahead).
      pending: the control flags raised and not read yet.
      epoch_done: the last call's batches ended the epoch.
      epoch_metrics: the epoch's step metrics, averaged on device (None: not begun).
      epoch_eval: the epoch's latest evaluation.
      last_eval: ``(step, metrics)`` of the latest evaluation.
      log_next: a callback asked for a log at the next step.
      in_step: inside the step call (its state may be donated half-way).
      interrupted: a first Ctrl-C landed inside the step and is held until it returns.
      stoppers: the host callbacks that asked to stop outright.
      warned_nonfinite: the warning of a non-finite loss was given.
    """

    state: Any
    step: int
    epoch: int
    feed: Feed
    pending: PendingFlags
    epoch_done: bool = False
    epoch_metrics: Means | None = None
    epoch_eval: dict | None = None
    last_eval: tuple = (None, None)
    log_next: bool = False
    in_step: bool = False
    interrupted: bool = False
    stoppers: list[str] = dataclasses.field(default_factory=list)
    warned_nonfinite: bool = False

    def signalled(self) -> None:
        """SIGTERM arrived (called by the signal handler: it only raises a flag)."""
        self.pending.signalled = True
