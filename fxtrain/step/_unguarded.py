"""Calling a compiled train step without Dynamo re-checking its guards on the whole state.

Before each call of a compiled function Dynamo checks its guards: one or more per tensor of the
state (shape, dtype, device, strides...) and per piece of its structure. On a tiny model that is
a fifth of the step. ``fit`` knows what can really change from one step to the next: the batch
(a short last batch, another dtype) and, in principle, the state's structure. So ``Unguarded``
makes the first call with the guards (compiling as usual), checks once that the step returns a
state of the structure it was given (then every later input has it too), and afterwards skips
the guards (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, during the call only:
``fxtrain._torch.stance``) whenever the batch has the shapes, dtypes and devices of that first
call. Any other batch goes through the guards, recompiling or picking another compiled graph as
Dynamo decides.

A step that checks its guards itself (``fx.precompiled``'s, outside Dynamo) offers an
``unguarded(state, batch)`` call that skips that check for batches like those it took; after
the same first call and structure check, ``Unguarded`` calls that instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._torch import stance
from ..data._feed import plain_tensors
from ._spec import is_compiled


_OFF = ()  # a signature no batch has: the fast path is off


def _signature(batch: Any) -> tuple:
    """The batch's structure and its leaves' shapes, dtypes and devices (values for others)."""
    plain = plain_tensors(batch)  # per step in fit: the common batches, read directly
    if plain is not None:  # a dict's keys in their order, as Dynamo guards them
        return (type(batch), tuple(batch) if type(batch) is dict else len(plain),
                tuple((t.shape, t.dtype, t.device) for t in plain))
    leaves, spec = pytree.tree_flatten(batch)
    return spec, tuple((leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor)
                       else (type(leaf), leaf) for leaf in leaves)


class Unguarded:
    """``step(state, batch, **kwargs)`` that skips Dynamo's guards once it is safe (see the
    module); ``kwargs`` (``donate=``) must be the same on every call."""

    def __init__(self, step: Callable):
        self.step = step
        # a step that checks its own guards (fx.precompiled's) says how to call it without
        self.skipping: Callable | None = getattr(step, "unguarded", None)
        on = self.skipping is not None or (is_compiled(step) and stance.available())
        self.warm: tuple | None = None if on else _OFF  # the first call's batch signature

    def __call__(self, state: Any, batch: Any, **kwargs: Any) -> tuple:
        if self.warm is _OFF:
            return self.step(state, batch, **kwargs)
        if self.warm is None:
            structure = pytree.tree_structure(state)  # before the step: it may donate the state
            out = self.step(state, batch, **kwargs)
            stable = structure == pytree.tree_structure(out[0])
            self.warm = _signature(batch) if stable else _OFF
            return out
        if self.skipping is not None:  # it compares the batch with those it took itself
            return self.skipping(state, batch, **kwargs)
        if _signature(batch) != self.warm:
            return self.step(state, batch, **kwargs)
        before = stance.skip_guards()
        try:
            return self.step(state, batch, **kwargs)
        finally:
            stance.restore(before)
