"""Packed sequences: documents laid end to end in rows of one length, no padding between them.

A batch of padded rows spends its compute on padding (rows as long as the longest document); a
packed row holds as many documents as fit, each a segment whose ``position_ids`` restart at 0.
Attention must not cross segments: transformers' models read the restarts themselves (with
``position_ids`` given and no ``attention_mask``, their SDPA path builds the block-diagonal
causal mask), and ``document_mask`` gives that mask for a model of your own. The first token of
each segment has label ``-100``: nothing before it in the row is its context, so no position
predicts it (as ``transformers.DataCollatorWithFlattening`` labels them), and
``fx.losses.causal_lm`` counts every other token once, as the padded batches' loss does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..losses._causal import IGNORE_INDEX


def pack_documents(documents: Iterable[Sequence[int] | torch.Tensor], length: int, *,
                   pad_id: int = 0, split: bool = False) -> dict[str, torch.Tensor]:
    """Documents (token id sequences) packed in order into rows of ``length`` tokens:
    ``{"input_ids", "labels", "position_ids"}``, each ``(rows, length)`` int64, ready for
    ``fx.data.Batches(packed, batch_size)``.

    A document that does not fit the rest of a row starts the next one (the rest is padded
    with ``pad_id`` as a segment of its own, labels ``-100``), so every document keeps all its
    context and its loss is the one a padded batch gives; one longer than ``length`` is cut into
    rows. ``split=True`` fills every row instead: a document goes on at the start of the next
    row as a new segment (positions from 0 again, its first token there without a target).
    ``packed_rows`` gives the same rows one at a time, for a stream of documents.

    Examples:
        >>> packed = fx.data.pack_documents([[5, 6, 7], [8, 9], [1, 2, 3, 4]], length=5)
        >>> packed["input_ids"]
        tensor([[5, 6, 7, 8, 9],
                [1, 2, 3, 4, 0]])
        >>> packed["position_ids"]
        tensor([[0, 1, 2, 0, 1],
                [0, 1, 2, 3, 0]])
        >>> packed["labels"]
        tensor([[-100,    6,    7, -100,    9],
                [-100,    2,    3,    4, -100]])
        >>> fx.data.pack_documents([[5, 6, 7], [8, 9], [1, 2, 3, 4]], 4, split=True)["input_ids"]
        tensor([[5, 6, 7, 8],
                [9, 1, 2, 3],
                [4, 0, 0, 0]])
    """
    rows = list(packed_rows(documents, length, pad_id=pad_id, split=split))
    return {name: torch.stack([row[name] for row in rows]) for name in _NAMES}


_NAMES = ("input_ids", "labels", "position_ids")


def packed_rows(documents: Iterable[Sequence[int] | torch.Tensor], length: int, *,
                pad_id: int = 0, split: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The rows of ``pack_documents`` one at a time, as the documents come: each a dict of
    ``(length,)`` int64 tensors. Reads only as many documents as the next row needs, so it
    packs a stream of any length (``fx.data.Stream(lambda epoch: packed_rows(...), ...)``).

    Examples:
        >>> rows = fx.data.packed_rows(iter([[5, 6, 7], [8, 9], [1, 2, 3, 4]]), length=5)
        >>> next(rows)["position_ids"]
        tensor([0, 1, 2, 0, 1])
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise ValueError(f"pack_documents: length must be an int of at least 2, got {length!r}")
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pack_documents: pad_id must be a token id >= 0, got {pad_id!r}")
    return _rows(documents, length, pad_id, split)


def _rows(documents: Iterable[Sequence[int] | torch.Tensor], length: int, pad_id: int,
          split: bool) -> Iterator[dict[str, torch.Tensor]]:
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []

    def pad(n: int) -> None:  # a segment of padding: no targets, attends to itself only
        ids.extend([pad_id] * n)
        positions.extend(range(n))
        labels.extend([IGNORE_INDEX] * n)

    def row() -> dict[str, torch.Tensor]:  # the first ``length`` tokens, taken off
        taken = {name: torch.tensor(values[:length], dtype=torch.int64)
                 for name, values in zip(_NAMES, (ids, labels, positions), strict=True)}
        for values in (ids, labels, positions):
            del values[:length]
        return taken

    made = False
    for i, document in enumerate(documents):
        tokens = document.tolist() if isinstance(document, torch.Tensor) else list(document)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise TypeError(f"pack_documents: document {i} holds something other than int "
                            f"token ids: {tokens[:5]!r}")
        if tokens and min(tokens) < 0:
            raise ValueError(f"pack_documents: document {i} holds a negative token id "
                             f"({min(tokens)}); token ids are >= 0 (a -100 would become a "
                             "label that marks no target): pack the tokenizer's input ids, "
                             "not labels")
        if tokens and not split and ids and len(tokens) > length - len(ids):
            pad(length - len(ids))  # whole documents: this one starts the next row
            yield row()
        while tokens:
            part, tokens = tokens[:length - len(ids)], tokens[length - len(ids):]
            ids.extend(part)
            positions.extend(range(len(part)))
            labels.extend([IGNORE_INDEX, *part[1:]])
            if len(ids) == length:
                made = True
                yield row()
    if ids:
        pad(length - len(ids))
        made = True
        yield row()
    if not made:
        raise ValueError("pack_documents: no tokens to pack (every document is empty)")


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The ``(batch, 1, length, length)`` bool mask for ``F.scaled_dot_product_attention`` of
    packed rows: a token attends to the earlier tokens of its own segment (a segment starts
    where ``position_ids`` does not go up by one). Tensor ops only: it compiles into a step.

    Examples:
        >>> fx.data.document_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    if position_ids.ndim != 2:
        raise ValueError(f"document_mask: position_ids must be (batch, length), got shape "
                         f"{tuple(position_ids.shape)}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.cumsum(-1)
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]
