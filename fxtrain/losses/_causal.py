"""Losses that say what they average over, so an update weighs every token (or item) alike.

A ``loss_fn`` that returns a plain 0-d loss gives the mean of its own batch, and the batches of
one update (micro-batches accumulated by ``fx.optim.multi_steps``, the ranks of a data-parallel
step) count alike whatever their sizes: the **plain mean**, right when every batch holds as many
items as the others. A language model's batches do not: padding and ``-100`` labels leave each
micro-batch with its own number of real tokens. A ``loss_fn`` that returns ``fx.losses.Mean(total,
count)`` (or ``(Mean, aux)``) says so, and the step weighs it by ``count``:

- on one process, its gradient is that of ``total / count``, as before;
- across data-parallel ranks, each rank's gradient counts by its ``count`` in the reduction, so
  the update is that of the sum over every rank's tokens divided by their number;
- across micro-batches, ``fx.optim.multi_steps`` sums ``count`` x gradient and divides by the
  summed ``count`` when it applies the update: accumulating 4 micro-batches gives the update of
  the one batch holding all of them (what ``transformers.Trainer`` does with
  ``num_items_in_batch``).

The step's ``loss`` metric is ``total / count`` of its batch (across ranks: of all ranks'
tokens), and ``loss_count`` its ``count``: ``fit``'s and ``log_metrics``'s averages over steps
weigh the loss by it, so a logged loss is the mean over every token of the interval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._labels import checked_labels
from ._mean import IGNORE_INDEX, Mean
from ._vocab_parallel import cross_entropy_total, is_vocab_sharded

def causal_lm(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
              shift: bool = True) -> Mean:
    """Next-token cross-entropy as a ``Mean`` over the tokens with a label.

    Args:
      logits: ``(batch, length, vocab)``, any float dtype (the loss is taken in float32).
        Loss parallel: a DTensor split along the vocabulary (a tensor-parallel plan's LM head
        with ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)``) is not
        gathered; each rank takes its columns' part of the loss (``_vocab_parallel.py``).
      labels: ``(batch, length)`` token ids, ``ignore_index`` where no loss is taken (padding,
        prompts, a packed sequence's document starts).
      shift: True (transformers' convention: ``labels`` are the input ids): position ``t``
        predicts label ``t + 1``; False: ``labels`` are already the targets of each position.

    Examples:
        >>> logits = torch.zeros(1, 3, 5)              # uniform over 5 tokens
        >>> labels = torch.tensor([[1, 2, -100]])      # the last position is padding
        >>> loss = fx.losses.causal_lm(logits, labels)
        >>> int(loss.count), round(float(loss.value), 4)  # one target: label 2 at position 1
        (1, 1.6094)
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"fx.losses.causal_lm: logits must be (batch, length, vocab) and labels "
                         f"(batch, length); got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    targets = labels.reshape(-1)
    if is_vocab_sharded(logits):  # loss parallel: the vocabulary split over the ranks
        # a label outside the vocabulary matches no rank's columns and would count with a
        # finite loss (as in the chunked kernel's one-hot): refused the same way, on device
        targets = checked_labels(targets, logits.shape[-1], ignore_index, "fx.losses.causal_lm")
        total = cross_entropy_total(logits.reshape(-1, logits.shape[-1]), targets, ignore_index)
        return Mean(total, (targets != ignore_index).sum())
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                            ignore_index=ignore_index, reduction="sum")
    return Mean(total, (targets != ignore_index).sum())
