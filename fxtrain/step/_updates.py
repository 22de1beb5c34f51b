"""How a train step applies its reduced gradients: one of three update strategies, chosen when
the step is planned (``_phases.planned``) from the layout, the transformation, donation and
compilation, and held on its ``Plan``:

- ``whole``: ``state.apply_gradients`` (flax's ``apply_gradients``: ``tx.update``, then
  ``apply_updates``), the default; eagerly, a sharded state's elementwise update runs on each
  rank's local shards (``apply_gradients``' own);
- ``donating``: eager, where the caller gives its state up (``fxtrain.donation``) and nothing
  can revert the update (no loss scale, no in-step callback): the same update, writing the
  optimizer's new state into the old one's storage as it goes, as ``torch.optim`` does
  (``apply_gradients(donated=True)``), so an AdamW update allocates one tree of the
  parameters' size where the whole update allocates a dozen;
- ``regional``: compiled, a regional state (``fx.regional``) whose update the layout planned
  (``Layout.block_update``): each block's update one call of a region (``_region_update``).

Each is ``update(state, grads, weight) -> (new state, squared norms of grads or None)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import donation
from ..state import TrainState
from . import _region_update

Result = tuple[TrainState, list | None]


def whole(state: TrainState, grads: dict[str, torch.Tensor],
          weight: torch.Tensor | None) -> Result:
    """``state.apply_gradients(grads, weight=weight)``."""
    return state.apply_gradients(grads, weight=weight), None


def donating(state: TrainState, grads: dict[str, torch.Tensor],
             weight: torch.Tensor | None) -> Result:
    """``whole``, writing the new optimizer state and parameters into ``state``'s (given up):
    where the update fails, part of the next step's values may be in that storage, so
    ``state`` is marked given up (``fxtrain.donation``) before the error goes on."""
    try:
        return state.apply_gradients(grads, weight=weight, donated=True), None
    except BaseException:
        donation.mark(state)
        raise


def regional(state: TrainState, grads: dict[str, torch.Tensor],
             weight: torch.Tensor | None) -> Result:
    """Each block's update a call of the layout's region (``_region_update.applied``); the
    whole update where the loss weighs its gradient (``fx.losses.Mean``: a transformation
    that accumulates by weight) or the state is not the one the layout's update was planned
    for (another transformation, or optimizer state of other kinds)."""
    if weight is None:
        by_blocks = _region_update.applied(state, grads)
        if by_blocks is not None:
            return by_blocks
    return whole(state, grads, weight)


def chosen(state: TrainState, autodiff: str, donates: bool, compiled: bool) -> Any:
    """The update strategy for ``state``: ``regional`` where a compiled step on autograd's
    path trains a state whose layout planned the blocks' update; ``donating`` where an eager
    step's caller gives its state up (``donates``: and nothing reverts the update); else
    ``whole``."""
    if compiled:  # regional checks that the plan fits this state (else the whole update)
        regional_ok = autodiff == "autograd" and state.layout.block_update is not None
        return regional if regional_ok else whole
    return donating if donates else whole
