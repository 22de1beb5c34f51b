"""Where non-finite values came from: each op or kernel that wrote one is an event, linked to the
events that wrote the non-finite values it read; a step's non-finite result leads back through
them to the first event that made non-finite values out of finite ones (``fx.debug``'s
``find_nonfinite``). Values that go non-finite and never reach a result (an attention mask's
``-inf``, an infinite gradient that a ``where`` drops) are not followed, and a NaN is followed
back through the inputs that hold a NaN, not through an infinity beside it (that mask's ``-inf``
added to scores that are NaN already).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Values:
    """What one tensor holds that is not finite: counts, size, shape and dtype."""

    nan: int
    inf: int
    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> Values:
        return cls(int(t.isnan().sum()), int(t.isinf().sum()), t.numel(), tuple(t.shape), t.dtype)

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {k}" for n, k in ((self.nan, "nan"), (self.inf, "inf")) if n)
        return f"{kinds} of {self.numel} (shape {self.shape}, {self.dtype})"


@dataclasses.dataclass(eq=False)
class Event:
    """An op or kernel that wrote non-finite values: what it is (``facts``, the fields of
    ``NonFinite`` it fills), the first such value, and the events behind what it read."""

    seq: int
    facts: dict[str, Any]
    value: str
    values: Values
    parents: tuple[Event, ...]


def checked(t: Any) -> bool:
    """Whether ``t`` is a tensor whose values can be non-finite and can be read here."""
    return (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
            and t.layout == torch.strided and t.device.type != "meta" and t.numel() > 0)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _key(t: torch.Tensor) -> tuple | None:
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None


def _whole(t: torch.Tensor) -> bool:
    try:
        return t.numel() * t.element_size() == t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return False


class Taint:
    """The events so far, and which storage holds non-finite values written by which event."""

    def __init__(self):
        self.events: list[Event] = []
        self.held: dict[tuple, Event] = {}  # storage -> the last event that wrote non-finite

    def record(self, read: list, written: list, facts: Callable[[], dict[str, Any]],
               names: list[str] | None = None) -> Event | None:
        """Notes an op or kernel that read ``read`` and wrote ``written`` (tensors; ``names``
        say which is which output; ``facts()`` describes it, asked only when it wrote a
        non-finite value). Returns its event then."""
        bad = None
        for i, t in enumerate(written):
            if not checked(t):
                continue
            if finite(t):
                if _whole(t):  # overwritten whole: what the storage held is gone
                    self.held.pop(_key(t), None)
            elif bad is None:
                bad = (i, t)
        if bad is None:
            return None
        parents = self.behind(read, nan=bool(bad[1].isnan().any()))
        facts = facts()
        inputs = [t for t in read if not any(t is w for w in written)]  # not updated in place
        if not parents and any(checked(t) and not finite(t) for t in inputs):
            facts["detail"] = " ".join(filter(None, (facts.get("detail"), (
                "(it read non-finite values that no watched op wrote: they began before it, "
                "outside what was watched)"))))
        event = Event(len(self.events), facts, names[bad[0]] if names else f"output {bad[0]}",
                      Values.of(bad[1]), parents)
        self.events.append(event)
        for t in written:
            if checked(t) and not finite(t):
                self.held[_key(t)] = event
        return event

    def behind(self, tensors: list, nan: bool = False) -> tuple[Event, ...]:
        """The events that wrote the non-finite values among ``tensors``; with ``nan``, those
        behind the ones that hold a NaN, when any does (a NaN is not made of another input's
        infinity: an attention mask's ``-inf`` beside scores that are already NaN)."""
        found = []
        for t in tensors:
            event = self.held.get(_key(t)) if checked(t) else None
            if event is not None and all(event is not e for e, _ in found) and not finite(t):
                found.append((event, t))
        if nan and any(bool(t.isnan().any()) for _, t in found):
            found = [(e, t) for e, t in found if bool(t.isnan().any())]
        return tuple(e for e, _ in found)

    def held_by(self, t: torch.Tensor) -> Event | None:
        return self.held.get(_key(t)) if checked(t) else None


def roots(event: Event) -> list[Event]:
    """The events without parents behind ``event`` (itself, when it has none)."""
    seen, frontier, out = {id(event)}, [event], []
    while frontier:
        e = frontier.pop()
        if not e.parents:
            out.append(e)
        for p in e.parents:
            if id(p) not in seen:
                seen.add(id(p))
                frontier.append(p)
    return out


def first_root(taint: Taint, results: list[tuple[str, torch.Tensor]]
               ) -> tuple[Event | None, tuple[str, ...], list[str]]:
    """The earliest root event behind the non-finite ``results`` (``(path, tensor)``), the
    paths of the results it reaches, and the non-finite results no event explains."""
    behind: dict[str, list[Event]] = {}
    unexplained = []
    for path, t in results:
        if not checked(t) or finite(t):
            continue
        event = taint.held_by(t)
        if event is None:
            unexplained.append(path)
        else:
            behind[path] = roots(event)
    found = [e for es in behind.values() for e in es]
    if not found:
        return None, (), unexplained
    first = min(found, key=lambda e: e.seq)
    return first, tuple(p for p, es in behind.items() if first in es), unexplained
