"""Dynamo's stance that skips guard evaluation, set around one call of a compiled step.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. The public route is
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, used as a context around the call.
It builds a new stance object and a context object on every call, and sets the stance three
times (on creation, on entry, on exit): on torch 2.13 it cost 6.2 us per call against 3.3 us
for Dynamo's own setter, ``torch._dynamo.eval_frame._set_stance`` (private), called twice with
a stance made once. ``fx.fit`` makes that call once per step, so it takes the private setter;
the stance it sets is the one the public call makes. On a torch without them (before 2.6)
``available()`` is False and every call checks its guards.

Nothing here is looked up before a compiled step needs it (``available()``): importing Dynamo
takes 1.4 s, which importing fxtrain and an eager run never pay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_set_stance: Callable | None  # set by _load_stance
_SKIP_GUARDS: Any


def _load_stance() -> bool:
    """Looks up Dynamo's stance setter and the stance that skips guards (``_set_stance`` and
    ``_SKIP_GUARDS``, None where torch has none) on first use. Whether the stance can be set."""
    if "_SKIP_GUARDS" not in globals():
        try:
            from torch._dynamo.eval_frame import DynamoStance, _set_stance
            stance = DynamoStance("default", skip_guard_eval_unsafe=True)
        except ImportError:
            _set_stance = stance = None
        globals().update(_set_stance=_set_stance, _SKIP_GUARDS=stance)
    return _SKIP_GUARDS is not None


def __getattr__(name: str):
    if name in ("_set_stance", "_SKIP_GUARDS"):
        _load_stance()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    """Whether this torch can skip a compiled call's guards (loads Dynamo on the first call)."""
    return _load_stance()


def skip_guards() -> Any:
    """Sets the stance that skips guard evaluation; returns the stance to ``restore`` (call
    ``available()`` first)."""
    return _set_stance(_SKIP_GUARDS)


def restore(previous: Any) -> None:
    """Sets back the stance ``skip_guards`` returned."""
    _set_stance(previous)
