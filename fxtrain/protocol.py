"""The callback protocol: events, controls, the fold, and the control's wire format in a step's
metrics. It sits below the state and the step, which use it; ``fx.callbacks`` and ``fx``
re-export it unchanged.

A callback is a function ``(state, event) -> (state, control)``; a plain function or lambda is
one, and one that only observes may return None. A stateful callback is a ``Callback`` value:
a ``name`` (its key in ``state.callbacks``, stable across checkpoints), an ``init(state)``
giving its initial state, and the function.
The loop folds callbacks left to right after each event and merges their controls with ``|``.

Controls hold Python bools on the host and 0-d bool tensors when computed with tensor maths
(inside a compiled step, or on the host without a sync); ``|`` works for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import struct

EVENT_KINDS = ("setup", "restore", "train_begin", "epoch_begin", "step_begin", "step_end",
               "eval_begin", "eval_batch", "eval_end", "epoch_end", "checkpoint", "train_end",
               "exception", "predict_end")
"""Every event kind, in the order ``fx.fit`` sends them (see ``Event``)."""
# what a Callback reacts to unless it names its kinds: all but step_begin and eval_batch, which
# cost a fold per batch and so go only to the callbacks that ask for them by name
PER_BATCH_KINDS = ("step_begin", "eval_batch")
DEFAULT_KINDS = tuple(k for k in EVENT_KINDS if k not in PER_BATCH_KINDS)
"""The kinds a ``Callback`` reacts to unless it names its own: all but ``step_begin`` and
``eval_batch``."""


@struct.dataclass
class Event:
    """Something that happened in the loop; ``metrics`` is a dict of 0-d tensors or numbers.

    The kinds, in the order ``fx.fit`` sends them:

    ===========  =================================================================================
    setup        first, once per ``fit`` call, the state made (callback states initialised,
                 restored when resuming); metrics the run's plan, as train_begin's
    restore      when ``fit`` resumed from a checkpoint; metrics ``{"step", "path"}``
    train_begin  once per ``fit`` call; metrics: the run's plan (max_steps, steps_per_epoch, ...)
    epoch_begin  before the first step of each epoch the call trains in (a resumed run's first
                 epoch included, though it began before); metrics None
    step_begin   before each step call, ``step`` the count before it; host only, and sent only to
                 a ``Callback`` that names it in ``kinds`` (a fold before every step costs time)
    step_end     after each step call, with the step's metrics
    eval_begin   before an evaluation; metrics None
    eval_batch   after each evaluation batch, with its metrics (``step`` the training step); host
                 only, and sent only to a ``Callback`` that names it in ``kinds``
    eval_end     after an evaluation, with its metrics (``<set>/<name>`` when ``eval_data`` is a
                 dict of sets: one event for all of them)
    epoch_end    at the end of an epoch, with the mean over its step_end events of each float
                 0-d training metric and, as ``eval/<name>``, the epoch's last evaluation
                 (``eval/<set>/<name>`` with several sets)
    checkpoint   after a save; metrics ``{"step", "path"}``
    train_end    last; metrics ``{"reason": ...}`` (``"error"`` after an exception event)
    exception    when an error (not Ctrl-C) ends the run, before train_end: ``error`` holds it
    predict_end  after ``fx.predict``'s last batch; metrics ``{"batches": n}``
    ===========  =================================================================================

    Examples:
        >>> event = fx.Event("step_end", step=10, metrics={"loss": torch.tensor(0.5)})
        >>> event.kind, event.step, event.epoch, event.metrics["loss"]
        ('step_end', 10, 0, tensor(0.5000))
        >>> fx.Event("exception", 3, error=ValueError("bad batch")).error
        ValueError('bad batch')
        >>> fx.Event("step_start")
        Traceback (most recent call last):
        ...
        ValueError: unknown event kind 'step_start'; expected one of ('setup', 'restore',
        'train_begin', 'epoch_begin', 'step_begin', 'step_end', 'eval_begin', 'eval_batch',
        'eval_end', 'epoch_end', 'checkpoint', 'train_end', 'exception', 'predict_end')
    """

    kind: str = struct.field(static=True)
    step: Any = 0
    epoch: Any = 0
    metrics: Mapping[str, Any] | None = None
    error: BaseException | None = struct.field(static=True, default=None)

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {EVENT_KINDS}")
        if (self.error is not None) != (self.kind == "exception"):
            raise ValueError("an exception event holds its error (Event('exception', ..., "
                             "error=e)), and only an exception event has one")


@struct.dataclass
class Control:
    """What callbacks ask the loop to do. ``a | b`` asks for everything either asks for.

    ``stop`` ends training, ``save`` writes a checkpoint, ``evaluate`` runs evaluation, ``log``
    asks logging callbacks to write now. ``skip`` discards the update of the step just taken
    (params, buffers and optimizer state go back to their values before it), as ``nan_guard``
    does for a non-finite step. ``stop_epoch`` ends the current epoch (the data goes on at the
    next epoch's start; HF's ``should_epoch_stop``), and ``abort`` ends training without the
    final checkpoint (Forgather's ``should_abort_without_save``); these two come from host
    callbacks (``fit`` reads them at once), not from inside a step.

    Examples:
        >>> fx.Control(save=True) | fx.Control(stop=True)
        Control(stop=True, save=True, evaluate=False, log=False, skip=False, stop_epoch=False,
                abort=False)

        Flags computed with tensors stay tensors (no sync); the loop reads them in batches:

        >>> loss = torch.tensor(float("nan"))
        >>> fx.Control(stop=~torch.isfinite(loss)) | fx.Control(log=True)
        Control(stop=tensor(True), save=False, evaluate=False, log=True, skip=False,
                stop_epoch=False, abort=False)
    """

    stop: Any = False
    save: Any = False
    evaluate: Any = False
    log: Any = False
    skip: Any = False
    stop_epoch: Any = False
    abort: Any = False

    def __or__(self, other: Control) -> Control:
        if not isinstance(other, Control):
            return NotImplemented
        if _asks_nothing(other):
            return self
        if _asks_nothing(self):
            return other
        return Control(**{name: getattr(self, name) | getattr(other, name) for name in FLAGS})


NOTHING = Control()  # the control that asks for nothing (shared: building one costs ~0.5 us)

# Control's flags by name, the one place that says which travels where; every read and write
# below and in ``fxtrain.loop._flags`` goes by these names, never by a field's position.
FLAGS = tuple(field.name for field in dataclasses.fields(Control))
"""Every flag of ``Control``, in its declaration order (the order of ``flags(c)``)."""
IN_STEP_FLAGS = ("stop", "save", "evaluate", "log")
"""The requests a step's callbacks may raise for the loop: they leave a compiled step as its
``control/<name>`` metrics, and ``fit`` reads (and, with several ranks, agrees on) them."""
APPLIED_FLAGS = ("skip",)
"""Acted on where the fold that raised them ran (inside the step, or by ``fit`` right after
a host step_end): never on the wire, never pending."""
HOST_FLAGS = ("stop_epoch", "abort")
"""Raised by host callbacks only, and acted on by ``fit`` at once (pending and agreed on, never
on the wire)."""
# IN_STEP_FLAGS + APPLIED_FLAGS + HOST_FLAGS == FLAGS: the in-step requests come first, so that
# ``Control(stop, save, evaluate, log, skip)`` keeps its meaning (tests/unit/test_control_wire.py)


def loop_event(kind: str, step: int, epoch: int, metrics: Mapping[str, Any] | None) -> Event:
    """``Event(kind, step, epoch, metrics)`` for a loop that sends a known kind without an error:
    built without the checks (several per step in ``fit``)."""
    event = object.__new__(Event)
    event.__dict__.update(kind=kind, step=step, epoch=epoch, metrics=metrics, error=None)
    return event


def _asks_nothing(c: Control) -> bool:
    return c is NOTHING or all(getattr(c, name) is False for name in FLAGS)


def flags(c: Control) -> tuple:
    """``c``'s flags, in ``FLAGS`` order (its fields' declaration order)."""
    return tuple(getattr(c, name) for name in FLAGS)


# The wire format of a control in a step's metrics: a compiled step returns its in-step
# callbacks' merged control as ``control/<name>`` 0-d bool tensors, one per IN_STEP_FLAGS name
# (``skip`` is applied inside the step, so it does not travel), and ``fit`` reads them back.
# These functions are the only ones that write or read the keys.
CONTROL_KEYS = tuple(f"control/{name}" for name in IN_STEP_FLAGS)
"""The ``control/*`` metrics keys, one per ``IN_STEP_FLAGS`` name, in its order."""
_WIRE = tuple(zip(IN_STEP_FLAGS, CONTROL_KEYS))  # (name, key) pairs, for the per-step reads
_STOP_KEY, _LOG_KEY = dict(_WIRE)["stop"], dict(_WIRE)["log"]


def control_to_metrics(control: Control, device: Any) -> dict[str, torch.Tensor]:
    """``control`` as the step's ``control/*`` metrics (0-d bool tensors on ``device``)."""
    return {key: torch.as_tensor(getattr(control, name), dtype=torch.bool, device=device)
            for name, key in _WIRE}


def control_from_metrics(metrics: Mapping[str, Any]) -> Control:
    """The control a step's metrics carry (``NOTHING`` when they carry none)."""
    if _STOP_KEY not in metrics:  # a step writes every key or none; the loop adds only the log
        return NOTHING
    return Control(**{name: metrics[key] for name, key in _WIRE})


def asks_to_log(metrics: Mapping[str, Any] | None) -> bool:
    """Whether the loop asked logging callbacks to write these metrics now (``control.log``
    was raised at the step before; see ``with_log_request``)."""
    return (metrics or {}).get(_LOG_KEY) is True


def with_log_request(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` marked for logging now (the loop's answer to a ``log`` request): a Python
    True, which no step writes, so ``asks_to_log`` needs no sync."""
    return {**metrics, _LOG_KEY: True}


@dataclasses.dataclass(frozen=True)
class Callback:
    """A callback with a name, optional state and a declared reach.

    Attributes:
      name: the key of its state in ``state.callbacks``.
      init: ``init(state) -> callback state``, or None for a callback without state.
      fn: ``fn(state, event) -> (state, control)``.
      kinds: the event kinds it reacts to; the fold skips it on others. The default is every
        kind but ``step_begin`` (``DEFAULT_KINDS``): name that one to get it.
      host: it does IO (or reads the clock), so it runs only in ``fit``, never inside a step.
      grad_stats: it reads the per-parameter gradient norms of the step's metrics.
      skips: it may ask to skip the step just taken (``Control.skip`` on step_end); run by
        ``fit`` on the host, it makes ``fit`` keep each step's old state instead of donating it.
      period: set by ``every(n, ...)`` (and the ``checkpoint`` policy): on the host the fold
        calls it on step_end only at multiples of ``period``, so a periodic callback costs
        nothing between its steps.
      save_veto: ``save_veto(its state) -> (flag, why)``: ``fit`` saves no checkpoint while
        ``flag`` holds (a bool or a 0-d bool tensor), and warns with ``why`` (``nan_guard``
        vetoes a state whose last step was not finite).
      stop_reason: ``stop_reason(its state) -> (flag, why)``: when a run stops, ``fit`` names
        this callback and ``why`` (a string, or a function making one, called only when
        ``flag`` holds).
      display: it shows the run's progress (``progress_bar``), so ``fit`` adds no default bar.

    Examples:
        A callback that counts steps in its state, a tensor, so it also runs inside a step:

        >>> def count(state, event):
        ...     n = fx.callbacks.callback_state(state, "steps_seen")
        ...     return fx.callbacks.set_callback_state(state, "steps_seen", n + 1), fx.Control()
        >>> counter = fx.callbacks.Callback("steps_seen", init=lambda state: torch.tensor(0),
        ...                                 fn=count, kinds=("step_end",))
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> data = fx.data.Batches((x, x.sum(1, keepdim=True)), 4)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.fit(state, fx.make_train_step(loss_fn), data, max_steps=3,
        ...                callbacks=[counter])  # fit creates its state
        >>> state.callbacks
        {'steps_seen': tensor(3)}
    """

    name: str
    init: Callable[[Any], Any] | None
    fn: Callable[[Any, Event], tuple[Any, Control]]
    kinds: tuple[str, ...] = DEFAULT_KINDS
    host: bool = False
    grad_stats: bool = False
    period: int = 1
    skips: bool = False
    save_veto: Callable[[Any], tuple[Any, str]] | None = None
    stop_reason: Callable[[Any], tuple[Any, Any]] | None = None
    display: bool = False

    def __post_init__(self):
        unknown = set(self.kinds) - set(EVENT_KINDS)
        if unknown:
            raise ValueError(f"callback {self.name!r}: unknown event kinds {sorted(unknown)}")

    def __call__(self, state, event):
        return self.fn(state, event)


@dataclasses.dataclass(frozen=True)
class StepState:
    """A state the train step owns and updates itself, kept in ``state.callbacks[name]`` beside
    the callbacks' states so that checkpoints carry it: ``"16-mixed"``'s loss scale
    (``fx.precision.loss_scale``). It has no function, so folds pass over it;
    ``TrainState.create``, ``fx.callbacks.init`` and ``fx.fit`` create it as they create a
    callback's state.

    Attributes:
      name: its key in ``state.callbacks``.
      init: ``init(state) -> its initial value``.

    Examples:
        >>> owned = fx.precision.loss_scale(init_scale=8.0)
        >>> type(owned).__name__, owned.name
        ('StepState', 'loss_scale')
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), callbacks=[owned])
        >>> state.callbacks["loss_scale"].scale
        tensor(8.)
        >>> fx.callbacks.fold([owned], state, fx.Event("step_end", 1))[0] is state
        True
    """

    name: str
    init: Callable[[Any], Any]


def name_of(cb: Callable) -> str:
    """A readable name for error messages."""
    if isinstance(cb, Callback):
        return repr(cb.name)
    return getattr(cb, "__qualname__", None) or repr(cb)


def callback_state(state: Any, name: str) -> Any:
    """The state of the callback called ``name``.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
        ...                              callbacks=[fx.callbacks.nan_guard()])
        >>> fx.callbacks.callback_state(state, "nan_guard")
        NanGuardState(skipped=tensor(0), flagged=tensor(False))
        >>> fx.callbacks.callback_state(state, "ema")
        Traceback (most recent call last):
        ...
        KeyError: "no callback state named 'ema' in state.callbacks (have ['nan_guard']); ..."
    """
    states = state.callbacks or {}
    if name not in states:
        raise KeyError(
            f"no callback state named {name!r} in state.callbacks (have {sorted(states)}); "
            "create the state with TrainState.create(..., callbacks=[...]) or "
            "fx.callbacks.init(callbacks, state)")
    return states[name]


def set_callback_state(state: Any, name: str, value: Any) -> Any:
    """``state`` with the callback called ``name`` holding ``value`` (a new state; the pair of
    ``callback_state``).

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> new = fx.callbacks.set_callback_state(state, "best", torch.tensor(0.25))
        >>> fx.callbacks.callback_state(new, "best"), state.callbacks  # state is unchanged
        (tensor(0.2500), None)
    """
    return state.replace(callbacks={**(state.callbacks or {}), name: value})


def _stateful(callbacks: Sequence[Any]) -> list[Callback | StepState]:
    found: dict[str, Callback | StepState] = {}
    for cb in callbacks:
        if isinstance(cb, StepState) or (isinstance(cb, Callback) and cb.init is not None):
            if cb.name in found:
                raise ValueError(
                    f"two callbacks are named {cb.name!r}; names are checkpoint keys, so give "
                    "the second one an explicit name=...")
            found[cb.name] = cb
    return list(found.values())


def init_states(callbacks: Sequence[Callable], state: Any) -> dict[str, Any] | None:
    """``{name: init(state)}`` for the stateful callbacks; duplicate names are an error.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> fx.callbacks.init_states([fx.callbacks.nan_guard(), print], state)  # print: no state
        {'nan_guard': NanGuardState(skipped=tensor(0), flagged=tensor(False))}
        >>> fx.callbacks.init_states([fx.callbacks.ema(0.9), fx.callbacks.ema(0.99)], state)
        Traceback (most recent call last):
        ...
        ValueError: two callbacks are named 'ema'; names are checkpoint keys, so give the second
        one an explicit name=...
        >>> sorted(fx.callbacks.init_states([fx.callbacks.ema(0.9),
        ...                                  fx.callbacks.ema(0.99, name="ema_slow")], state))
        ['ema', 'ema_slow']
    """
    return {cb.name: cb.init(state) for cb in _stateful(callbacks)} or None


def init(callbacks: Sequence[Callable], state: Any) -> Any:
    """``state`` with an initial state for each stateful callback that has none yet.

    For a loop of your own (``fx.fit`` does this itself); states already there are kept.

    Examples:
        >>> guard = fx.callbacks.nan_guard()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> state = fx.callbacks.init([guard], state)
        >>> before = state.callbacks["nan_guard"]
        >>> state = fx.callbacks.init([guard, fx.callbacks.ema()], state)
        >>> sorted(state.callbacks), state.callbacks["nan_guard"] is before
        (['ema', 'nan_guard'], True)
    """
    existing = dict(state.callbacks or {})
    missing = {cb.name: cb.init(state) for cb in _stateful(callbacks) if cb.name not in existing}
    return state.replace(callbacks={**existing, **missing}) if missing else state


def _check_result(cb: Callable, state: Any, result: Any) -> tuple[Any, Control]:
    if type(result) is tuple and len(result) == 2 and result[1] is NOTHING:
        return result  # the common answer, checked first: folds run it per step
    if result is None:  # an observer (a print in a notebook) changes nothing
        return state, NOTHING
    ok = isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Control)
    if not ok:
        raise TypeError(f"callback {name_of(cb)} returned {type(result).__name__}; a callback "
                        "must return (state, fx.Control(...)), or None to change nothing")
    return result


def fold(callbacks: Sequence[Callable], state: Any, event: Event) -> tuple[Any, Control]:
    """Runs ``callbacks`` left to right on ``event``; each sees the state the previous left.

    Returns the last state and the controls merged with ``|``; a callback that returns None
    changes nothing.

    Examples:
        >>> def show(state, event):  # an observer
        ...     print("saw", event.kind, "at step", event.step)
        >>> def stop_at_2(state, event):
        ...     return state, fx.Control(stop=event.step >= 2)
        >>> def save_always(state, event):
        ...     return state, fx.Control(save=True)
        >>> fx.callbacks.fold([show, stop_at_2, save_always], None, fx.Event("step_end", 2))
        saw step_end at step 2
        (None, Control(stop=True, save=True, evaluate=False, log=False, skip=False,
                       stop_epoch=False, abort=False))
    """
    state, control, _ = fold_reporting(callbacks, state, event)
    return state, control


def takes_step_end(cb: Callable) -> bool:
    """Whether a fold over step_end events may call ``cb`` (a loop folds only these per step)."""
    if isinstance(cb, Callback):
        return "step_end" in cb.kinds
    return not isinstance(cb, StepState)  # a plain function sees every kind but step_begin


def _decides_alike(cb: Callable) -> bool:
    """Whether ``cb`` decides alike on every rank: a ``Callback`` that does no IO and reads no
    clock (``host=False``) is a pure function of the state and the event, which are the same on
    every rank (gradients and metrics are averaged in the step, evaluations merged)."""
    return isinstance(cb, Callback) and not cb.host


def fold_reporting(callbacks: Sequence[Callable], state: Any, event: Event,
                   stoppers: list[str] | None = None) -> tuple[Any, Control, bool]:
    """``fold``, also reporting whether a callback that decides alike on every rank asked for
    ``stop``, ``save``, ``evaluate`` or ``log`` outright (a Python ``True``): several ranks can
    act on such a request at once, where one rank's wish must wait for a collective read. The
    names of the callbacks that asked to stop outright are appended to ``stoppers``."""
    control, alike = NOTHING, False
    kind, step = event.kind, event.step
    for cb in callbacks:
        if isinstance(cb, Callback):
            if kind not in cb.kinds or (cb.period > 1 and kind == "step_end"
                                        and type(step) is int and step % cb.period):
                continue
            result = cb.fn(state, event)
        elif isinstance(cb, StepState):  # the step updates it; nothing to call
            continue
        elif kind != "step_begin":  # a plain function reacts to DEFAULT_KINDS
            result = cb(state, event)
        else:
            continue
        state, c = _check_result(cb, state, result)
        if c is not NOTHING:
            control = control | c
            alike = alike or (_decides_alike(cb)
                              and any(getattr(c, name) is True for name in IN_STEP_FLAGS))
            if c.stop is True and stoppers is not None:
                stoppers.append(cb.name if isinstance(cb, Callback) else name_of(cb))
    return state, control, alike


def _read_flags(callbacks: Sequence[Callable], state: Any,
                field: str) -> list[tuple[str, str]]:
    """``(name, why)`` of each callback whose ``field(its state) -> (flag, why)`` holds; the
    tensor flags are read together, in one sync."""
    states = state.callbacks or {}
    asked = [(cb.name, *getattr(cb, field)(states[cb.name])) for cb in callbacks
             if isinstance(cb, Callback) and getattr(cb, field) is not None
             and cb.name in states]
    if not asked:
        return []
    read = torch.stack([torch.as_tensor(flag).cpu() for _, flag, _ in asked]).tolist()
    return [(name, why() if callable(why) else why) for (name, _, why), on in zip(asked, read)
            if on]


def stop_reasons(callbacks: Sequence[Callable], state: Any) -> list[tuple[str, str]]:
    """``(name, why)`` of the ``callbacks`` whose ``stop_reason`` says they stopped the run."""
    return _read_flags(callbacks, state, "stop_reason")


def save_veto(callbacks: Sequence[Callable], state: Any) -> str | None:
    """Why ``state`` must not be checkpointed (a ``Callback.save_veto`` of ``callbacks``
    holds), or None."""
    return next((f"{name} flagged it as {why}"
                 for name, why in _read_flags(callbacks, state, "save_veto")), None)
