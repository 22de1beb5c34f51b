"""``TrainState``: the whole training run as one immutable pytree value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import random, struct
from .callbacks.core import init_states
from .optim.base import GradientTransformation, apply_updates
from .tree import check_same_structure

__all__ = ["TrainState"]


def _clone_all(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v.clone() for k, v in tensors.items()}


@struct.dataclass(kw_only=True)
class TrainState:
    """Step counter, parameters, buffers, optimizer state, RNG key, data position and callback
    states, as one frozen value. ``module`` and ``tx`` are static: part of the structure, not
    leaves, and never saved in checkpoints.

    Example::

        state = TrainState.create(model, fx.optim.adamw(1e-3), seed=0)
        logits = state.apply(state.params, x)
        state = state.apply_gradients(grads)
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] | None
    opt_state: Any
    rng: torch.Tensor
    data: Any = None
    callbacks: dict[str, Any] | None = None
    module: nn.Module = struct.field(static=True, repr=False)
    tx: GradientTransformation = struct.field(static=True, repr=False)
    # True only for the private copy a train step hands to the loss function: its buffers are
    # fresh clones that the module may update in place (BatchNorm statistics).
    owns_buffers: bool = struct.field(static=True, default=False, repr=False)

    @classmethod
    def create(cls, model: nn.Module, tx: GradientTransformation, *, seed: int = 0,
               callbacks: Sequence[Callable] = ()) -> TrainState:
        """A fresh state: copies of ``model``'s trainable parameters and of its buffers (frozen
        parameters count as buffers), ``tx.init(params)``, step 0 and the key of ``seed``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainState.create needs an nn.Module, got {type(model).__name__}")
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters "
                             "(none with requires_grad=True); there is nothing to train")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {**frozen, **{n: b.detach().clone() for n, b in model.named_buffers()}}
        device = next(iter(params.values())).device
        state = cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            params=params,
            buffers=buffers or None,
            opt_state=tx.init(params),
            rng=random.seed_key(seed, device),
            module=model,
            tx=tx,
        )
        return state.replace(callbacks=init_states(callbacks, state))

    def apply(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Runs the module with ``params`` and this state's buffers; the state is not changed."""
        buffers = self.buffers if self.owns_buffers else _clone_all(self.buffers)
        tensors = params if buffers is None else {**params, **buffers}
        return functional_call(self.module, tensors, args, kwargs)

    def apply_gradients(self, grads: dict[str, torch.Tensor]) -> TrainState:
        """One optimizer update: a new state with step + 1, new params and optimizer state."""
        check_same_structure(self.params, grads, "the gradients")
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=apply_updates(self.params, updates),
                            opt_state=opt_state)

    def with_private_buffers(self) -> TrainState:
        """A copy whose buffers are fresh clones that ``apply`` may update in place."""
        return self.replace(buffers=_clone_all(self.buffers), owns_buffers=True)
