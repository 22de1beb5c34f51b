"""``fx.metrics.from_torchmetrics``: a ``torchmetrics.Metric`` as an fxtrain metric class.

The adapted class keeps the torchmetrics metric's states as its leaves and reduces them as
torchmetrics declares; its update runs torchmetrics' own eager code as one opaque operator
(``fxtrain::torchmetrics_update``) inside a compiled step. torchmetrics is an optional
dependency (``pip install 'fxtrain[metrics]'``), imported when ``from_torchmetrics`` is called.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .. import struct
from ._metric import Metric


def from_torchmetrics(metric: Any) -> type:
    """A Metric class backed by a ``torchmetrics.Metric``'s states.

    ``from_model_output(preds, target, mask=None)`` resets a scratch copy of ``metric``, runs
    its ``update`` (rows where ``mask`` is False are dropped) and keeps the states; ``merge``
    reduces them as declared (``dist_reduce_fx`` sum, mean (weighted by updates), max, min or
    cat); ``compute`` loads them into a copy and calls its ``compute``, on the host (``evaluate``
    calls it after the loop). Needs torchmetrics (an optional dependency).

    Inside ``torch.compile(eval_step, fullgraph=True)`` the update is one opaque operator
    (``fxtrain::torchmetrics_update``): torchmetrics' own eager code runs at that point of the
    graph, so the values equal torchmetrics' exactly, in one graph without recompiles (and
    with torchmetrics' own host syncs, such as MeanMetric's NaN check). That needs tensor
    states of a fixed shape and dtype. A metric with list ("cat") states, such as
    ``BinaryAUROC()``, works outside compiled code only; inside it raises an error naming the
    fix (a binned ``BinaryAUROC(thresholds=100)`` has fixed-size states). ``merge`` is plain
    tensor arithmetic and compiles as well.

    Examples:
        >>> import torchmetrics
        >>> accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        >>> Acc = fx.metrics.from_torchmetrics(accuracy)
        >>> first = Acc.from_model_output(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        >>> second = Acc.from_model_output(torch.tensor([2]), torch.tensor([2]))
        >>> first.merge(second).compute()
        tensor(0.7500)
    """
    try:
        import torchmetrics
        from torchmetrics.utilities import (dim_zero_cat, dim_zero_max, dim_zero_mean,
                                            dim_zero_min, dim_zero_sum)
    except ImportError as err:
        raise ImportError("fx.metrics.from_torchmetrics needs torchmetrics: "
                          "pip install 'fxtrain[metrics]'") from err
    if not isinstance(metric, torchmetrics.Metric):
        raise TypeError(f"from_torchmetrics: expected a torchmetrics.Metric, got "
                        f"{type(metric).__name__}")
    known = {dim_zero_sum: "sum", dim_zero_mean: "mean", dim_zero_max: "max",
             dim_zero_min: "min", dim_zero_cat: "cat"}
    scratch = metric.clone()
    scratch.reset()
    kinds = {}
    for name, fn in scratch._reductions.items():  # torchmetrics keeps no public accessor
        if fn not in known:
            raise ValueError(f"from_torchmetrics: state {name!r} of {type(metric).__name__} has "
                             f"reduction {fn!r}; only sum, mean, max, min and cat are supported")
        kinds[name] = known[fn]
    cls = struct.dataclass(type("TorchMetric", (_TorchMetric,), {
        "__annotations__": {}, "__module__": __name__,
        "__qualname__": f"from_torchmetrics({type(metric).__name__})"}))
    cls._metric, cls._kinds, cls._key = scratch, kinds, len(_ADAPTED)
    cls._specs = {k: (v.shape, v.dtype) for k, v in scratch.metric_state.items()
                  if isinstance(v, torch.Tensor)}
    cls._update = _update_op()
    _ADAPTED.append(cls)
    return cls


_ADAPTED: list[type] = []  # every from_torchmetrics class, indexed by its _key


def _scratch_update(cls: type, preds: torch.Tensor, target: torch.Tensor,
                    mask: torch.Tensor | None) -> dict:
    """The states of ``cls``'s torchmetrics metric after ``reset`` and one ``update``."""
    scratch = cls._metric
    if scratch.device != preds.device:
        scratch.to(preds.device)
    if mask is not None:
        keep = mask.to(torch.bool)
        preds, target = preds[keep], target[keep]
    scratch.reset()
    scratch.update(preds, target)
    return scratch.metric_state


@functools.cache
def _update_op():
    """The operator that runs a from_torchmetrics class's update, opaque to torch.compile: its
    output shapes and dtypes are the class's state specs, its values torchmetrics' eager ones."""

    @torch.library.custom_op("fxtrain::torchmetrics_update", mutates_args=())
    def update(key: int, preds: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None) -> list[torch.Tensor]:
        cls = _ADAPTED[key]
        states = _scratch_update(cls, preds, target, mask)
        for name, (shape, dtype) in cls._specs.items():
            if states[name].shape != shape or states[name].dtype != dtype:
                raise ValueError(
                    f"{cls.__qualname__}: update changed state {name!r} from {tuple(shape)} "
                    f"{dtype} to {tuple(states[name].shape)} {states[name].dtype}; a compiled "
                    f"step needs fixed states: give inputs of the metric's dtype, or update it "
                    f"outside the compiled step")
        return [states[name].clone() for name in cls._specs]  # fresh: never the scratch's

    @update.register_fake
    def _(key, preds, target, mask):
        del target, mask
        specs = _ADAPTED[key]._specs.values()
        return [preds.new_empty(shape, dtype=dtype) for shape, dtype in specs]

    return update


def _tuple_lists(states: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in states.items()}


@struct.dataclass
class _TorchMetric(Metric):
    """States of a torchmetrics metric (lists as tuples) and how many updates made them."""

    states: dict
    updates: torch.Tensor
    _metric = None  # the scratch torchmetrics metric: reset and updated for each batch
    _kinds = {}     # state name -> reduction
    _specs = {}     # tensor state name -> (shape, dtype)
    _key = -1       # index in _ADAPTED
    _update = None  # _update_op()

    @classmethod
    def empty(cls, *, device=None, dtype=None):
        del dtype  # the torchmetrics metric fixes its own dtypes
        device = torch.get_default_device() if device is None else device
        defaults = cls._metric._defaults  # the reset values (no public accessor)
        states = {k: defaults[k].to(device, copy=True) if k in cls._specs else ()
                  for k in cls._kinds}
        return cls(states, torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def from_model_output(cls, preds, target, mask=None, **unused):
        """Args: preds and target as the torchmetrics ``update`` takes them; mask per row."""
        del unused
        preds, target = preds.detach(), target.detach()
        if len(cls._specs) == len(cls._kinds):  # fixed tensor states: the opaque operator
            values = cls._update(cls._key, preds, target, mask)
            states = dict(zip(cls._specs, values))
        elif torch.compiler.is_compiling():
            raise TypeError(cls._list_states_message())
        else:
            states = _tuple_lists(_scratch_update(cls, preds, target, mask))
        return cls(states, torch.ones((), dtype=torch.int64, device=preds.device))

    @classmethod
    def _list_states_message(cls) -> str:
        lists = sorted(set(cls._kinds) - set(cls._specs))
        return (f"{cls.__qualname__} keeps list states {lists}, whose size depends on the data, "
                f"so it cannot run inside a compiled step: update it outside the compiled step "
                f"(return its inputs from the step), use a form with fixed-size states (for "
                f"curves, thresholds=N), or fx.metrics.Accuracy/Average/ConfusionMatrix")

    def merge(self, other):
        self._check_same_type(other)
        merged = {k: _reduce(self._kinds[k], a, other.states[k], self.updates, other.updates)
                  for k, a in self.states.items()}
        return type(self)(merged, self.updates + other.updates)

    def compute(self):
        """Runs on the host (a copy of the torchmetrics metric); not inside a compiled step."""
        fresh = self._metric.clone()
        for name, value in self.states.items():
            setattr(fresh, name, list(value) if isinstance(value, tuple) else value)
        with warnings.catch_warnings():
            if self.updates > 0:  # the states are real; torchmetrics only counts its own updates
                warnings.filterwarnings("ignore", message=".*before the ``update``")
            return fresh.compute()


def _reduce(kind: str, a: Any, b: Any, n_a: torch.Tensor, n_b: torch.Tensor) -> Any:
    if kind == "sum":
        return a + b
    if kind == "max":
        return torch.maximum(a, b)
    if kind == "min":
        return torch.minimum(a, b)
    if kind == "cat":
        return (*a, *b) if isinstance(a, tuple) else torch.cat([a, b])
    total = (n_a + n_b).clamp_min(1)  # "mean": weight each side by its number of updates
    return (a * n_a + b * n_b) / total
