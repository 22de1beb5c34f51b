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
  (``Layout.block_update``): each block's update one call of a region (``_region_update``);
- ``offloaded``: a state whose layout keeps the optimizer state in host memory
  (``fx.shard(offload="optimizer")``): the same update run on the host, on copies of the
  gradient and parameter shards, the new parameters copied back (``donated``: as
  ``donating``, into the host copies and the optimizer state).

Each is ``update(state, grads, weight) -> (new state, squared norms of grads or None)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import distributed, donation
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


def offloaded(state: TrainState, grads: dict[str, torch.Tensor],
              weight: torch.Tensor | None, donated: bool = False,
              pinned: bool = True) -> Result:
    """``whole`` (``donating`` where ``donated``) on the host, where the layout keeps the
    optimizer state (``fxtrain.distributed._offload``): the gradients and the parameters'
    shards copied there (``pinned``: into pinned memory, eagerly), updated, and the new
    parameters copied back to their devices (on a CPU-only machine nothing moves)."""
    host = state.replace(params=distributed.to_host(state.params, pinned))
    try:
        new, squared = (donating if donated else whole)(host, distributed.to_host(grads, pinned),
                                                        weight)
    except BaseException:
        if donated:  # its optimizer state, shared with host's, may be written into
            donation.mark(state)
        raise
    return new.replace(params=distributed.to_devices(new.params, state.params)), squared


def offloaded_donating(state: TrainState, grads: dict[str, torch.Tensor],
                       weight: torch.Tensor | None) -> Result:
    """``offloaded``, the caller giving ``state`` up (``donating``)."""
    return offloaded(state, grads, weight, donated=True)


def offloaded_compiled(state: TrainState, grads: dict[str, torch.Tensor],
                       weight: torch.Tensor | None) -> Result:
    """``offloaded`` in a compiled step: the copies are the graph's."""
    return offloaded(state, grads, weight, pinned=False)


def chosen(state: TrainState, autodiff: str, donates: bool, compiled: bool) -> Any:
    """The update strategy for ``state``: ``regional`` where a compiled step on autograd's
    path trains a state whose layout planned the blocks' update; ``donating`` where an eager
    step's caller gives its state up (``donates``: and nothing reverts the update); else
    ``whole``. A layout that offloads the optimizer state updates on the host
    (``offloaded``; donating eagerly as above; ``offloaded_compiled`` compiled)."""
    if state.layout.offload is not None:
        if compiled:
            return offloaded_compiled
        return offloaded_donating if donates else offloaded
    if compiled:  # regional checks that the plan fits this state (else the whole update)
        regional_ok = autodiff == "autograd" and state.layout.block_update is not None
        return regional if regional_ok else whole
    return donating if donates else whole
