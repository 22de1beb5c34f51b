"""``predict``: batched inference over a dataset, outputs gathered in order.

Each batch goes to the state's device and through ``predict_fn(state, batch)`` with the module
in eval mode, without gradients and with randomness keyed on the state (as ``make_eval_step``
does), so a ``torch.compile``'d ``predict_fn`` compiles once and runs without a host sync; the
outputs stay on the device until the last batch and are then concatenated along the batch
dimension. Under torch.distributed each rank predicts its share (a sharded ``fx.data.Batches``
gives rank ``r`` the ``r``-th part of each global batch) and every rank gets all the outputs,
interleaved back into the order one process would have produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import distributed, donation, random
from ..protocol import Event, fold
from ._evaluation import batch_size_of
from ..data._feed import to_device
from ..distributed import with_whole_params
from ..state import set_training
from ..tree import tree_map

_PREDICT_STREAM = 0x50524544  # "PRED": predict_fn's random stream, apart from training's


def _check_outputs(out: Any, size: int, index: int, spec: Any) -> Any:
    """The pytree structure of one batch's outputs, refused unless every leaf is a tensor with
    one row per example and the structure is the first batch's."""
    leaves, here = pytree.tree_flatten(out)
    paths = [pytree.keystr(p) or "the output" for p, _ in pytree.tree_flatten_with_path(out)[0]]
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"predict: predict_fn returned a {type(leaf).__name__} at {path} "
                            f"for batch {index}; it must return a tensor or a pytree (dict, "
                            "tuple, list) of tensors, one row per example")
        if leaf.ndim == 0 or leaf.shape[0] != size:
            raise ValueError(f"predict: {path} of batch {index} has shape {tuple(leaf.shape)}, "
                             f"but the batch has {size} examples; predict concatenates outputs "
                             "along their first dimension, so each needs one row per example")
    if not leaves:
        raise TypeError(f"predict: predict_fn returned no tensors for batch {index}")
    if spec is not None and here != spec:
        raise ValueError(f"predict: batch {index}'s outputs have structure {here}, unlike the "
                         f"first batch's {spec}")
    return here


def _interleaved(per_rank: Sequence[list]) -> list:
    """Each rank's outputs per batch index, back in one process's order: batch ``i`` of rank 0,
    of rank 1, ..., then batch ``i + 1`` (a rank's empty share is None)."""
    longest = max(len(outs) for outs in per_rank)
    return [outs[i] for i in range(longest) for outs in per_rank
            if i < len(outs) and outs[i] is not None]


def predict(predict_fn: Callable[[Any, Any], Any], state: Any, data: Iterable, *,
            callbacks: Sequence[Callable] = ()) -> Any:
    """Runs ``predict_fn(state, batch)`` over ``data`` and returns its outputs for every example.

    Args:
      predict_fn: ``(state, batch) -> outputs``, a tensor or a pytree of tensors whose first
        dimension is the batch's; usually ``torch.compile``'d (``fullgraph=True``).
      state: a ``TrainState``.
      data: an iterable of batches (``fx.data.Batches(..., shuffle=False, drop_last=False)``
        keeps every example, in order).
      callbacks: host callbacks; they get one ``predict_end`` event (``{"batches": n}``) at the
        end, as observers: their changes to the state are not returned.

    Returns:
      The outputs of all batches concatenated along the first dimension, in the structure
      ``predict_fn`` returns, on the state's device; under torch.distributed the same on every
      rank, in one process's order.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(3, 2), fx.optim.sgd(0.1))
        >>> x = torch.randn(10, 3)
        >>> def predict_fn(state, x):
        ...     logits = state.apply(state.params, x)
        ...     return {"logits": logits, "label": logits.argmax(-1)}
        >>> out = fx.predict(predict_fn, state, fx.data.Batches(x, 4, shuffle=False,
        ...                                                     drop_last=False))
        >>> out["logits"].shape, out["label"].shape  # batches of 4, 4 and 2
        (torch.Size([10, 2]), torch.Size([10]))
        >>> torch.equal(out["logits"], state.apply(state.params, x))
        True
        >>> fx.predict(lambda state, x: {"n": len(x)}, state, [x])
        Traceback (most recent call last):
        ...
        TypeError: predict: predict_fn returned a int at ['n'] for batch 0; it must return a
        tensor or a pytree (dict, tuple, list) of tensors, one row per example
    """
    donation.check_live(state, "predict")
    state = with_whole_params(state)  # a sharded state's, gathered once for all batches
    device = state.step.device
    key = random.fold_in(random.step_key(state.rng, state.step), _PREDICT_STREAM)
    outputs: list = []  # one entry per batch: its outputs, or None for an empty share
    spec = None
    was = set_training(state.module, False)
    try:
        with torch.no_grad(), random.keyed(key):
            for index, batch in enumerate(data):
                size = batch_size_of(batch)
                if size == 0:  # a rank's empty share of a short last batch
                    outputs.append(None)
                    continue
                out = predict_fn(state, to_device(batch, device))
                spec = _check_outputs(out, size, index, spec)
                outputs.append(out)
    finally:
        set_training(state.module, was)
    if distributed.world_size() > 1:
        to_cpu = lambda tree: tree_map(lambda t: t.cpu(), tree)  # noqa: E731
        gathered = distributed.all_gather([None if o is None else to_cpu(o) for o in outputs])
        outputs = [tree_map(lambda t: t.to(device), o) for o in _interleaved(gathered)]
    else:
        outputs = [o for o in outputs if o is not None]
    if not outputs:
        raise ValueError("predict: the data yielded no batches")
    epoch = int(state.data.epoch) if state.data is not None else 0
    fold(callbacks, state, Event("predict_end", int(state.step), epoch,
                                 {"batches": len(outputs)}))
    return pytree.tree_map(lambda *parts: torch.cat(parts), *outputs)
