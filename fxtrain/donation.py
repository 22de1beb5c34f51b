"""Buffer donation: a train step that reuses the storage of the state it is given.

A functional step returns a new state and leaves the old one intact, so while it runs both are
alive: parameters, buffers and optimizer state twice. JAX avoids this by *donating* the input
buffers: the caller gives the old state up, the step writes the new values into its storage,
and the old value is marked deleted. fxtrain does the same: with donation the step copies each
new tensor into the old state's tensor of the same place (under ``torch.compile`` the kernels
write there directly), returns a state built on those tensors, and replaces the old state's
fields with ``Donated`` markers, so any later use raises ``DonatedError`` instead of silently
reading the next step's values.

``make_train_step(..., donate=True)`` always donates; ``donate=None`` (the default) donates
when its caller passes ``train_step(state, batch, donate=True)``: ``fx.fit`` does, as it gives
its old states up after every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from ._torch.traced_errors import fail, raisable

__all__ = ["DonatedError", "Donated", "donate", "check_live"]  # mark: fit's own

# The fields a step donates; ``rng`` is never written and ``data`` is the host's.
DONATED_FIELDS = ("step", "params", "buffers", "opt_state", "callbacks")


@raisable
class DonatedError(RuntimeError):
    """A donated state (or one of its fields) was used after the step that took it.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     return state.apply(params, batch).square().mean()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> new, metrics = fx.make_train_step(loss_fn, donate=True)(state, torch.ones(4, 2))
        >>> int(new.step)
        1
        >>> state.params
        <donated params>
    """


class Donated:
    """What a donated state's fields hold: any use of it raises ``DonatedError``."""

    __slots__ = ("field",)

    def __init__(self, field: str):
        object.__setattr__(self, "field", field)

    def error(self) -> DonatedError:
        return DonatedError(self.message())

    def message(self) -> str:
        return (
            f"this TrainState was donated to a train step, which wrote the next step's values "
            f"into its storage, so its {self.field} can no longer be read; use the state the "
            "step returned (make_train_step(..., donate=False) keeps every state usable, at the "
            "cost of a second copy of the parameters and optimizer state)")

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    __getitem__ = __iter__ = __len__ = __contains__ = __bool__ = __call__ = _fail
    __int__ = __float__ = __index__ = __neg__ = __pos__ = __abs__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _fail
    __rtruediv__ = __floordiv__ = __mod__ = __pow__ = __matmul__ = __rmatmul__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol probes (copy, pickle): not there
            raise AttributeError(name)
        raise self.error()

    def __setattr__(self, name: str, value: Any) -> None:
        raise self.error()

    def __repr__(self) -> str:
        return f"<donated {self.field}>"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        marker = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, Donated))
        raise marker.error()


_MARKERS = {field: Donated(field) for field in DONATED_FIELDS}


def given_up(state: Any) -> bool:
    """Whether ``state`` was donated (its values given up)."""
    return isinstance(getattr(state, "step", None), Donated)


def check_live(state: Any, where: str) -> None:
    """Raises ``DonatedError`` when ``state`` was donated (``where`` names the caller)."""
    if given_up(state):  # fail: the error itself out of a trace too (torch 2.11's Dynamo
        fail(DonatedError, f"{where}: {state.step.message()}")  # keeps not even its text)


def _eligible(old: Any, new: Any) -> bool:
    return (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)
            and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
            and not old.requires_grad)


def _donated_leaves(old_leaves: list, new_leaves: list) -> list:
    """For each place, the tensor to return: the old tensor (to be overwritten with the new
    value) where it can take it, otherwise the new one. An old tensor takes at most one new
    value, and a new value that *is* an old tensor overwritten elsewhere is cloned first."""
    taken: list[torch.Tensor] = []
    plan = []
    for o, n in zip(old_leaves, new_leaves):
        if n is o or not _eligible(o, n) or any(o is t for t in taken):
            plan.append((None, n))
        else:
            taken.append(o)
            plan.append((o, n))
    # values that must survive the writes: pass-through old tensors that another place reuses
    plan = [(o, n.clone() if o is None and any(n is t for t in taken) else n) for o, n in plan]
    for o, n in plan:
        if o is not None:
            o.copy_(n)
    return [n if o is None else o for o, n in plan]


def written_into(old: Any, new: Any) -> Any:
    """``new`` with its tensors written into ``old``'s storage where a place's shape, dtype and
    device agree (``old``, a tree of the same structure, is given up; see ``donate``)."""
    old_leaves, _ = pytree.tree_flatten(old)
    new_leaves, spec = pytree.tree_flatten(new)
    if len(old_leaves) != len(new_leaves):
        return new
    return pytree.tree_unflatten(_donated_leaves(old_leaves, new_leaves), spec)


def donate(old: Any, new: Any) -> Any:
    """``new`` with its tensors written into ``old``'s storage, and ``old`` marked donated.

    Both are states of the same structure (``new`` came from a step on ``old``). Tensors of a
    place whose shape, dtype or device changed, or that the step passed through unchanged,
    are returned as they are.
    """
    olds, news = [getattr(old, f) for f in DONATED_FIELDS], [getattr(new, f) for f in DONATED_FIELDS]
    old_leaves, _ = pytree.tree_flatten(olds)
    new_leaves, spec = pytree.tree_flatten(news)
    if len(old_leaves) != len(new_leaves):  # the structure changed (a callback's state): no reuse
        out = new
    else:
        out = new.replace(**dict(zip(DONATED_FIELDS, pytree.tree_unflatten(
            _donated_leaves(old_leaves, new_leaves), spec))))
    mark(old)
    return out


def mark(state: Any) -> None:
    """Marks ``state`` donated: its fields become ``Donated`` markers (the value is given up)."""
    for field in DONATED_FIELDS:
        object.__setattr__(state, field, _MARKERS[field])
