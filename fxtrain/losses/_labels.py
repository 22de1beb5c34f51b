"""The labels a vocabulary can take: each a token id below its size, or ``ignore_index``.

A label outside the vocabulary matches no column of the logits. ``F.cross_entropy`` fails on
it (an index out of range), but the losses that pick the target's column themselves do not:
the chunked loss's compiled kernel (a one-hot matching nothing, ``_chunked.py``) and loss
parallel (no rank holding the column, ``_vocab_parallel.py``) would count the token with a
finite loss and a gradient toward no target. Both check their labels here first, and the error
names the loss the user called, the label and the vocabulary.
"""

from __future__ import annotations

import torch

from .._torch import kernels


@torch.library.custom_op("fxtrain::checked_labels", mutates_args=())
def checked_labels(targets: torch.Tensor, vocab: int, ignore_index: int,
                   loss: str) -> torch.Tensor:
    """A copy of ``targets``, each of which must be ``ignore_index`` or a token id below
    ``vocab``; else a ``ValueError`` naming ``loss`` (the public loss called: its name opens
    the message), the first bad label and the vocabulary.

    One operator, whose copy the loss reads (so a compiled graph keeps it), called as it is
    by a compiled step: the check is a reduction over the labels and a device-side assert
    (``kernels.assert_on_device``), no read on the host. Where it fails at once (the CPU), the
    first bad label is read and named; on CUDA torch's device-side assert reports it."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    try:
        kernels.assert_on_device(~bad.any(), _label_error(loss, "a label", vocab, ignore_index))
    except RuntimeError:
        first = int(targets[bad][0])  # only on failure: the step stops here anyway
        raise ValueError(_label_error(loss, f"label {first}", vocab, ignore_index)) from None
    return targets.clone()


@checked_labels.register_fake
def _(targets, vocab, ignore_index, loss):
    return torch.empty_like(targets)


@torch.library.register_vmap("fxtrain::checked_labels")
def _(info, in_dims, targets, vocab, ignore_index, loss):
    """Every entry's labels checked at once (the batched dimension is one more of tokens)."""
    del info
    return checked_labels(targets, vocab, ignore_index, loss), in_dims[0]


def _label_error(loss: str, label: str, vocab: int, ignore_index: int) -> str:
    return (f"{loss}: {label} is not a token of the head's vocabulary of {vocab} (ids 0 to "
            f"{vocab - 1}, or ignore_index {ignore_index} for no loss); make the tokenizer's "
            f"ids fit the head (resize the embeddings and the head to len(tokenizer)) and "
            f"label padding {ignore_index}")
