"""Context parallelism's slices of a sequence: which positions a rank holds, and its batch.

A context-parallel group of ``size`` ranks splits every sequence of its batch into ``2 * size``
equal chunks; rank ``r`` holds chunk ``r`` and chunk ``2 * size - 1 - r`` (head and tail), so
under a causal mask every rank attends over as many keys as the others (torch's round-robin
load balance for causal attention, ``_HeadTailLoadBalancer``). ``slots`` gives those positions;
``sliced`` cuts a batch to them, as one process's batch would read at those positions:

- the labels are shifted on the whole row before the cut (``shift_labels``, transformers' name:
  the target of each position, ``-100`` for the last), since a rank's last position's target
  is on another rank; the loss takes them unshifted (``fx.losses.causal_lm(logits,
  batch["shift_labels"], shift=False)``, or a transformers model's own loss given
  ``shift_labels``);
- ``position_ids`` (``0 .. length - 1``) are made and cut, so rotary embeddings and learned
  positions see each token's position in the whole sequence;
- packed documents come as a batch's own ``position_ids``, restarting at each document's first
  token (transformers' packed format, ``DataCollatorWithFlattening``'s): they are cut as they
  are, and ``document_mask`` is added, once per step: for each of this rank's positions, the
  whole row's positions it attends (same document, not after it; a new document wherever a
  position is not the one before it plus one, transformers' rule), the keys in the order the
  ranks' slices gather in. Given to the model with the rest of the batch, it reaches the
  attention layers (transformers passes a model's keyword arguments down to its attention),
  which all take that one tensor (``fxtrain.distributed._context_attention``): no layer
  rebuilds it, and autograd saves it once for all of them.

``laid_out`` reads a mesh with a context dimension: the parameters shard over that dimension
together with the one before it (torchtitan's ``dp_shard_cp``), so ``fx.shard`` lays them out
on a mesh of one dimension fewer, and the context-parallel ranks reduce their gradients as data
ranks do; only the batch (one share per context-parallel group) and attention (a ring over the
group) tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._torch.modes import outside_dispatch_modes
from ._layout import Context

IGNORE_INDEX = -100
"""The target of a position without one (the last): transformers' and ``fx.losses``'
ignore index (``fxtrain.losses`` sits on a higher floor than this package)."""

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "shift_labels", "inputs_embeds")
_REFUSED = {
    "attention_mask": "a padding mask: pad every sequence to the length with labels -100 and "
                      "drop attention_mask (the loss counts no -100 label, and causal "
                      "attention keeps real tokens from reading the padding after them)",
    "cu_seq_lens_q": "packed documents' boundaries in flash attention's form; give them as "
                     "position_ids restarting at each document",
    "cu_seq_lens_k": "packed documents' boundaries in flash attention's form; give them as "
                     "position_ids restarting at each document",
    "document_ids": "documents given by number; give packed documents as position_ids "
                    "restarting at each document",
    "document_mask": "the name context parallelism gives the mask it makes from the batch's "
                     "position_ids; give packed documents as position_ids restarting at each "
                     "document",
}


def slots(length: int, size: int, rank: int) -> torch.Tensor:
    """The positions of a sequence of ``length`` that rank ``rank`` of ``size`` holds: its
    head chunk then its tail chunk, ``length // size`` positions."""
    if length % (2 * size):
        raise ValueError(f"context parallelism over {size} ranks cuts each sequence into "
                         f"{2 * size} equal chunks; a length of {length} is not a multiple of "
                         f"{2 * size}: pad the sequences to a multiple (labels -100 on the "
                         "padding, which the loss does not count)")
    chunk = length // (2 * size)
    head = torch.arange(rank * chunk, (rank + 1) * chunk)
    tail = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)
    return torch.cat([head, tail])


def documents(positions: torch.Tensor) -> torch.Tensor:
    """Each token's document in rows of packed ``positions`` ``(batch, length)``: a new one
    wherever a position is not the one before it plus one (transformers'
    ``find_packed_sequence_indices``), numbered from 0 in each row."""
    before = torch.cat([positions[:, :1] - 1, positions[:, :-1]], dim=1)
    return (positions - before != 1).cumsum(1)


def document_mask(positions: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """What rank ``rank`` of ``size``'s positions attend in rows of packed ``positions``
    ``(batch, length)``: ``(batch, length // size, length)``, true where the key is of the
    query's document and not after it, the keys in the order the ranks' slices gather in
    (rank 0's, then rank 1's, ...)."""
    length = positions.shape[1]
    ids = documents(positions)
    mine = slots(length, size, rank).to(positions.device)
    theirs = torch.cat([slots(length, size, r) for r in range(size)]).to(positions.device)
    same = ids.index_select(1, mine)[:, :, None] == ids.index_select(1, theirs)[:, None, :]
    return same & (theirs[None, None, :] <= mine[None, :, None])


def sliced(batch: Any, size: int, rank: int) -> dict[str, Any]:
    """This rank's slice of ``batch``, a mapping of ``(batch, length, ...)`` tensors (see the
    module); other entries pass as they are."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"context parallelism cuts a batch given as a dict of (batch, length) "
                        f"tensors (input_ids, labels, position_ids); got "
                        f"{type(batch).__name__}")
    for name, why in _REFUSED.items():
        if name in batch:
            raise ValueError(f"context parallelism: the batch holds {name!r}, {why}")
    if "labels" in batch and "shift_labels" in batch:
        raise ValueError("context parallelism: the batch holds both labels and shift_labels; "
                         "give one")
    ids = batch.get("input_ids", batch.get("inputs_embeds"))
    if ids is None:
        raise ValueError(f"context parallelism: the batch has no input_ids (its keys: "
                         f"{sorted(batch)})")
    rows, length = ids.shape[:2]
    out = dict(batch)
    if "labels" in batch:
        labels = batch["labels"]
        out["shift_labels"] = torch.cat(
            [labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)
        del out["labels"]
    if "position_ids" in batch:
        positions = batch["position_ids"]
        if positions.dim() != 2 or positions.shape[1] != length \
                or positions.shape[0] not in (1, rows):
            raise ValueError(f"context parallelism: position_ids is {tuple(positions.shape)}, "
                             f"input_ids {tuple(ids.shape)}; each must be (batch, length)")
        out["position_ids"] = positions = positions.expand(rows, length)
        out["document_mask"] = document_mask(positions, size, rank)
    else:
        out["position_ids"] = torch.arange(length, device=ids.device).expand(rows, length)
    index = slots(length, size, rank).to(ids.device)
    for name in SEQUENCE_KEYS:
        if name in out:
            value = out[name]
            if value.shape[:2] != (rows, length):
                raise ValueError(f"context parallelism: {name} is {tuple(value.shape)}, "
                                 f"input_ids {tuple(ids.shape)}; each must be (batch, length)")
            out[name] = value.index_select(1, index)
    return out


def laid_out(mesh: Any, name: str, tp_plan: Any, made: Any) -> tuple[Any, Context]:
    """The mesh ``fx.shard`` lays the parameters out on, and the ``Context``, for ``mesh`` whose
    dimension ``name`` splits the sequences: that dimension merged into the one before it,
    which must be the dimension that shards (``(dp, cp)`` and ``(cp,)``: 1-D; ``(dp, cp, tp)``
    and ``(cp, tp)`` with a plan: FSDP x TP; ``(replicate, shard, cp)``: HSDP). ``made(shape,
    names)`` makes a mesh over the same ranks."""
    names = tuple(mesh.mesh_dim_names or ())
    if name not in names:
        raise ValueError(f"fx.shard(context={name!r}): the mesh's dimensions are named "
                         f"{names or 'nothing'}; name the one that splits the sequences (make "
                         "the mesh with fx.sharding.mesh(shape, names))")
    with outside_dispatch_modes():
        order = mesh.mesh.flatten().tolist()
    if order != list(range(len(order))):
        raise ValueError(f"fx.shard(context={name!r}): the mesh lays the ranks out as "
                         f"{mesh.mesh.tolist()}; fxtrain takes them in order (init_device_mesh's)")
    c = names.index(name)
    context = Context(dim=name, size=mesh.size(c), rank=mesh.get_local_rank(c),
                      group=mesh.get_group(c))
    shape, dims = list(mesh.shape), list(names)
    if c > 0:
        shape[c - 1] *= shape.pop(c)
        dims[c - 1] = f"{dims[c - 1]}_{dims.pop(c)}"
    merged = c - 1 if c > 0 else 0  # the dimension the context ranks now shard along
    shard_dim = 0 if len(shape) == 1 or tp_plan is not None else 1
    if len(shape) > 2 or merged != shard_dim or (tp_plan is not None and len(shape) != 2):
        layouts = "(dp, cp) or (cp,); (dp, cp, tp) or (cp, tp) with a tp_plan; (replicate, " \
                  "shard, cp) for HSDP"
        raise ValueError(f"fx.shard(context={name!r}): a mesh {names} puts the context "
                         f"dimension where it would not shard the parameters with the data; "
                         f"it comes right after the dimension that shards: {layouts}")
    with outside_dispatch_modes():  # a simulated rank's fake mode would fake the mesh's tensor
        merged_mesh = made() if len(shape) == 1 else made(tuple(shape), tuple(dims))
    return merged_mesh, context
