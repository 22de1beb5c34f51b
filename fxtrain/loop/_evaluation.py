"""``evaluate``: run an eval step over a dataset and average its metrics on device.

The eval step returns a dict whose values are 0-d tensors (averaged over examples, weighting
each batch by its size: the first dimension of its first tensor) or ``fx.metrics`` values
(merged with their own rule), or a whole ``fx.metrics.Collection``. Nothing is read back to the
host here; the result is a dict of 0-d tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import distributed
from ..data._feed import to_device
from ..metrics._builtin import Average, Metric
from ..distributed import with_whole_params
from ..tree import tree_map


def batch_size_of(batch: Any) -> int:
    """The first dimension of the batch's first tensor with one (1 if it has none).

    Examples:
        >>> from fxtrain.loop._evaluation import batch_size_of
        >>> batch_size_of({"ids": torch.zeros(8, 128, dtype=torch.long), "step": 3})
        8
    """
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim:
            return leaf.shape[0]
    return 1


def _weighted(value: torch.Tensor, weight: int) -> Average:
    """A batch's 0-d mean as an ``Average`` of ``weight`` examples."""
    value = value.detach().to(torch.promote_types(value.dtype, torch.float32))
    return Average(value * weight, torch.full((), weight, dtype=torch.int64, device=value.device))


def _accumulate(acc: dict, out: Mapping, weight: int) -> None:
    for key, value in out.items():
        if not isinstance(value, Metric):
            value = _as_average(key, value, weight)
        acc[key] = value if key not in acc else acc[key].merge(value)


def _as_average(key: str, value: Any, weight: int) -> Average:
    if not isinstance(value, torch.Tensor | float | int) or isinstance(value, bool):
        raise TypeError(f"eval metric {key!r} is a {type(value).__name__}; expected a 0-d "
                        "tensor, a number or an fx.metrics value")
    value = torch.as_tensor(value)
    if value.ndim:
        raise ValueError(f"eval metric {key!r} has shape {tuple(value.shape)}; reduce it "
                         "to a 0-d tensor or return an fx.metrics value")
    return _weighted(value, weight)


def _computed(acc: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in acc.items():
        result = value.compute()
        if isinstance(result, Mapping):  # a Collection inside the dict
            out.update({f"{key}/{k}": v for k, v in result.items()})
        else:
            out[key] = result
    return out


def _across_ranks(acc: dict, collection: Any) -> tuple[dict, Any]:
    """Every rank's unreduced metrics merged in rank order, on every rank (one all-gather):
    each metric merges by its own rule, so averages weigh each rank by its examples."""
    device = next((leaf.device for leaf in pytree.tree_leaves((acc, collection))
                   if isinstance(leaf, torch.Tensor)), torch.device("cpu"))
    to = lambda tree, d: tree_map(lambda x: x.to(d), tree)  # noqa: E731
    merged_acc, merged = {}, None
    for part_acc, part in distributed.all_gather(to((acc, collection), "cpu")):
        for key, value in part_acc.items():
            merged_acc[key] = value if key not in merged_acc else merged_acc[key].merge(value)
        if part is not None:
            merged = part if merged is None else merged.merge(part)
    return to(merged_acc, device), to(merged, device)


def evaluate(eval_step: Callable, state: Any, data: Iterable, *,
             on_batch: Callable[[Any], None] | None = None) -> dict[str, torch.Tensor]:
    """Runs ``eval_step(state, batch)`` over ``data``; returns the averaged metrics.
    ``on_batch(metrics)`` gets each batch's metrics as ``eval_step`` returned them (``fit``'s
    eval_batch event).

    Under torch.distributed each rank evaluates its data (a sharded ``fx.data.Batches``) and
    the metrics are merged across ranks, so every rank returns the same values.

    Examples:
        >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> state = fx.TrainState.create(nn.Linear(3, 2), fx.optim.sgd(0.1))
        >>> def metrics_fn(state, batch):
        ...     x, y = batch
        ...     return {"accuracy": (state.apply(state.params, x).argmax(-1) == y).float().mean()}
        >>> data = fx.data.Batches((x, y), 4, shuffle=False, drop_last=False)  # 4, 4 and 2
        >>> metrics = fx.evaluate(fx.make_eval_step(metrics_fn), state, data)
        >>> metrics["accuracy"].shape, len(data)
        (torch.Size([]), 3)
    """
    acc: dict[str, Any] = {}
    collection = None
    state = with_whole_params(state)  # a sharded state's, gathered once for all batches
    for batch in data:
        size = batch_size_of(batch)
        if size == 0:  # a rank's empty share of a short last batch
            continue
        out = eval_step(state, to_device(batch, state.step.device))
        if on_batch is not None:
            on_batch(out)
        if isinstance(out, Metric):  # a whole Collection (or one metric)
            collection = out if collection is None else collection.merge(out)
        elif isinstance(out, Mapping):
            _accumulate(acc, out, size)
        else:
            raise TypeError(f"eval_step returned {type(out).__name__}; expected a dict of "
                            "metrics or an fx.metrics value")
    if distributed.world_size() > 1:
        acc, collection = _across_ranks(acc, collection)
    if collection is None and not acc:
        raise ValueError("evaluation data yielded no batches")
    if collection is not None:
        result = collection.compute()
        return dict(result) if isinstance(result, Mapping) else {"value": result}
    return _computed(acc)
