"""Loss parallel: the cross-entropy of logits split along the vocabulary over the ranks of a
tensor-parallel group, without gathering them (torch's ``loss_parallel``, traceable).

A plan whose LM head keeps its output split (``ColwiseParallel(output_layouts=Shard(-1),
use_local_output=False)``) gives logits as a DTensor ``Shard(-1)`` over its 1-D mesh: each rank
holds ``vocab / n`` columns of every token's row. The loss of a token is
``log sum_v exp(z_v) - z_target``, and each term is a sum over the vocabulary, so each rank
sums its own columns and the ranks add their sums (all-reduces of one number per token):

    m   = max over the ranks of each rank's max  (subtracted before exp; no gradient)
    s   = sum over the ranks of  sum_v exp(z_v - m)
    t   = sum over the ranks of  (z_target - m  where the target is among this rank's columns)
    loss = log s - t

The sums are DTensor redistributions (``Partial`` to ``Replicate``), so autograd takes their
backward (each rank's gradient is ``softmax - onehot`` on its own columns) and a compiled step
traces them into its one graph. torch's own ``loss_parallel()`` context is not traced by Dynamo
(torch 2.13: the cross-entropy then fails on a DTensor inside the compiled step).
"""

from __future__ import annotations

import torch


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """Whether ``logits`` is a DTensor on a 1-D mesh split along its last dimension."""
    from ..distributed import is_dtensor
    if not is_dtensor(logits) or logits.device_mesh.ndim != 1:
        return False
    from torch.distributed.tensor import Shard
    (placement,) = logits.placements
    return isinstance(placement, Shard) and placement.dim in (-1, logits.ndim - 1)


def _summed(local: torch.Tensor, mesh, op: str = "sum") -> torch.Tensor:
    """``local`` reduced (``op``) over the ranks of ``mesh``, differentiably."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    partial = DTensor.from_local(local, mesh, [Partial(op)], run_check=False)
    return partial.redistribute(mesh, [Replicate()]).to_local()


def cross_entropy_total(logits: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int) -> torch.Tensor:
    """The summed float32 cross-entropy of vocabulary-split ``logits`` (``(tokens, vocab)``,
    ``is_vocab_sharded``) against ``targets`` (``(tokens,)``, whole on every rank), over the
    targets that are not ``ignore_index``: a plain 0-d tensor, the same on every rank."""
    mesh = logits.device_mesh
    local = logits.to_local().float()
    # torch.chunk's split (the last rank may hold fewer), untested eagerly; compiled, torch
    # 2.13's backward of an uneven DTensor failed on its shape (fx.shard splits evenly only)
    width = -(-logits.shape[-1] // mesh.size())
    start = mesh.get_coordinate()[0] * width
    peak = _summed(local.detach().amax(-1), mesh, "max")
    shifted = local - peak[:, None]
    total = _summed(shifted.exp().sum(-1), mesh)
    column = targets - start
    here = (column >= 0) & (column < local.shape[-1])
    picked = shifted.gather(-1, column.clamp(0, local.shape[-1] - 1)[:, None])[:, 0]
    target = _summed(torch.where(here, picked, torch.zeros_like(picked)), mesh)
    loss = total.log() - target
    return torch.where(targets != ignore_index, loss, torch.zeros_like(loss)).sum()
