"""Metric values in the style of clu's ``metrics``: frozen pytrees that merge.

A metric is a small frozen value of tensors. ``from_model_output(**outputs)`` makes one from a
batch, ``merge`` adds two together, ``compute`` turns the sums into the number. Every leaf is a
tensor and ``empty()`` has the same structure and dtypes as a real value, so metrics leave a
``torch.compile(fullgraph=True)`` eval step and merge on the device with no host sync and no
recompiles. Accumulators are float32 (float64 for float64 inputs); counts are int64. To merge
inside a compiled step on an accelerator, start from ``empty(device=...)`` on that device.

Examples:
    >>> import torch.nn.functional as F
    >>> model = nn.Linear(4, 3)
    >>> Metrics = fx.metrics.Collection.create(
    ...     loss=fx.metrics.Average.from_output("loss"), accuracy=fx.metrics.Accuracy)
    >>> def eval_step(x, y):  # compiles with torch.compile(fullgraph=True) as it is
    ...     logits = model(x)
    ...     loss = F.cross_entropy(logits, y, reduction="none")
    ...     return Metrics.single_from_model_output(loss=loss, logits=logits, labels=y)
    >>> totals = Metrics.empty()
    >>> with torch.no_grad():
    ...     for x, y in [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]:
    ...         totals = totals.merge(eval_step(x, y))
    >>> sorted(totals.compute())
    ['accuracy', 'loss']
    >>> int(totals.accuracy.count)
    24
"""

from __future__ import annotations

import copyreg
import functools
import keyword
import warnings
from typing import Any

import torch

from . import struct

__all__ = ["Metric", "Average", "Std", "LastValue", "Accuracy", "ConfusionMatrix", "Collection",
           "from_torchmetrics"]


class _Made(type):
    """The metaclass of metric classes made by a factory (``from_output``, ``for_classes``,
    ``Collection.create``): such a class pickles as the cached factory call that makes it, so
    its values travel between processes (evaluation merges them across ranks)."""

    _recipe: tuple = ()


def _remake(factory, *args):
    return factory(*args)


def _reduce_made(cls: type):
    """The factory call for a factory-made class; a user's subclass of one pickles by name."""
    return (_remake, cls._recipe) if "_recipe" in vars(cls) else cls.__qualname__


copyreg.pickle(_Made, _reduce_made)


class Metric:
    """Interface: ``empty``, ``from_model_output``, ``merge`` and ``compute``."""

    @classmethod
    def empty(cls, *, device=None, dtype=torch.float32):
        """The value that ``merge`` leaves unchanged (same structure as a real one)."""
        raise NotImplementedError(f"{cls.__qualname__} must define empty()")

    @classmethod
    def from_model_output(cls, **outputs):
        """The metric of one batch of model outputs."""
        raise NotImplementedError(f"{cls.__qualname__} must define from_model_output()")

    def merge(self, other):
        """The metric of both ``self``'s and ``other``'s data."""
        raise NotImplementedError(f"{type(self).__qualname__} must define merge()")

    def compute(self):
        """The final number (a 0-d tensor)."""
        raise NotImplementedError(f"{type(self).__qualname__} must define compute()")

    @classmethod
    def from_output(cls, name: str) -> type:
        """A subclass whose ``from_model_output(**outputs)`` reads ``outputs[name]``.

        ``outputs["mask"]``, when given, is passed on, except for a 0-d output (a batch-level
        value such as a mean loss), where it is dropped. The class is cached per ``(cls, name)``.

        Examples:
            >>> Loss = fx.metrics.Average.from_output("loss")
            >>> outputs = {"loss": torch.tensor([0.5, 1.5]), "logits": torch.zeros(2, 3)}
            >>> Loss.from_model_output(**outputs).compute()
            tensor(1.)
        """
        if not isinstance(name, str):
            raise TypeError(f"from_output: name must be a str, got {type(name).__name__}")
        return _from_output_class(cls, name)

    def _check_same_type(self, other: Any) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(self).__qualname__} with "
                            f"{type(other).__qualname__}; merge values of the same metric class")


@functools.cache
def _from_output_class(base: type, name: str) -> type:
    class FromOutput(base, metaclass=_Made):
        _recipe = (_from_output_class, base, name)

        @classmethod
        def from_model_output(cls, **outputs):
            if name not in outputs:
                raise KeyError(f"{cls.__qualname__}: no model output named {name!r}; "
                               f"got {sorted(outputs)}")
            values, mask = torch.as_tensor(outputs[name]), outputs.get("mask")
            return super().from_model_output(values, mask=None if values.ndim == 0 else mask)

    FromOutput.__name__ = f"{base.__name__}_{name}"
    FromOutput.__qualname__ = f"{base.__qualname__}.from_output({name!r})"
    FromOutput.__module__ = base.__module__
    return struct.dataclass(FromOutput)


def _masked(values: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` in the accumulator dtype and a bool mask of the same shape."""
    values = torch.as_tensor(values)
    values = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32)
    if mask is None:
        return values, torch.ones_like(values, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=values.device)
    if mask.shape != values.shape[:mask.ndim]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the leading shape "
                         f"of values {tuple(values.shape)}")
    mask = mask.to(torch.bool).reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return values, mask.expand(values.shape)


def _sums(values: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked sum of ``values`` and the count of elements that were kept."""
    values, mask = _masked(values, mask)
    return torch.where(mask, values, 0).sum(), mask.sum()


def _zeros(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((), device=device, dtype=dtype), torch.zeros((), device=device,
                                                                    dtype=torch.int64)


@struct.dataclass
class Average(Metric):
    """The mean of every (unmasked) element seen; an empty Average computes to NaN (0 / 0).

    Examples:
        >>> m = fx.metrics.Average.from_model_output(torch.tensor([1.0, 2.0]))
        >>> m.merge(fx.metrics.Average.from_model_output(torch.tensor(6.0))).compute()
        tensor(3.)
        >>> values, mask = torch.tensor([1.0, 9.0]), torch.tensor([True, False])
        >>> fx.metrics.Average.from_model_output(values, mask=mask).compute()
        tensor(1.)
        >>> fx.metrics.Average.empty().compute()
        tensor(nan)
    """

    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, *, device=None, dtype=torch.float32):
        return cls(*_zeros(device, dtype))

    @classmethod
    def from_model_output(cls, values, mask=None, **unused):
        """Args: values (any shape); mask, a prefix of ``values.shape``. Other outputs ignored."""
        del unused
        return cls(*_sums(values, mask))

    def merge(self, other):
        self._check_same_type(other)
        return type(self)(self.total + other.total, self.count + other.count)

    def compute(self):
        return self.total / self.count


@struct.dataclass
class Std(Metric):
    """The population standard deviation of every element seen; empty computes to NaN.

    Keeps ``(mean, m2, count)`` with ``m2`` the sum of squared deviations, merged with Chan's
    parallel formula ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n`` (stable for large means).

    Examples:
        >>> fx.metrics.Std.from_model_output(torch.tensor([1.0, 3.0])).compute()
        tensor(1.)
    """

    mean: torch.Tensor
    m2: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, *, device=None, dtype=torch.float32):
        mean, count = _zeros(device, dtype)
        return cls(mean, mean.clone(), count)

    @classmethod
    def from_model_output(cls, values, mask=None, **unused):
        """Args: values (any shape); mask, a prefix of ``values.shape``. Other outputs ignored."""
        del unused
        values, mask = _masked(values, mask)
        count = mask.sum()
        mean = torch.where(mask, values, 0).sum() / count.clamp_min(1).to(values.dtype)
        return cls(mean, torch.where(mask, (values - mean) ** 2, 0).sum(), count)

    def merge(self, other):
        self._check_same_type(other)
        count = self.count + other.count
        delta = other.mean - self.mean
        weight = other.count.to(delta.dtype) / count.clamp_min(1).to(delta.dtype)
        m2 = self.m2 + other.m2 + delta * delta * self.count.to(delta.dtype) * weight
        return type(self)(self.mean + delta * weight, m2, count)

    def compute(self):
        return torch.sqrt(self.m2 / self.count)


@struct.dataclass
class LastValue(Average):
    """The mean of the most recent non-empty batch; merging keeps ``other`` unless it is empty.

    Examples:
        >>> a = fx.metrics.LastValue.from_model_output(torch.tensor(1.0))
        >>> b = fx.metrics.LastValue.empty()
        >>> a.merge(b).compute(), b.merge(a).compute()
        (tensor(1.), tensor(1.))
    """

    def merge(self, other):
        self._check_same_type(other)
        newer = other.count > 0
        return type(self)(torch.where(newer, other.total, self.total),
                          torch.where(newer, other.count, self.count))


@struct.dataclass
class Accuracy(Average):
    """The fraction of ``logits.argmax(-1) == labels``; an Average of 0/1 values.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
        >>> fx.metrics.Accuracy.from_model_output(logits, torch.tensor([0, 1, 1, 1])).compute()
        tensor(0.7500)
    """

    @classmethod
    def from_model_output(cls, logits, labels, mask=None, **unused):
        """Args: logits (..., classes); integer labels (...); mask, a prefix of labels.shape."""
        del unused
        if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(f"Accuracy: logits {tuple(logits.shape)} must be labels' shape "
                             f"{tuple(labels.shape)} plus a class dimension")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"Accuracy: labels must be integer class ids, got {labels.dtype}")
        return cls(*_sums(logits.argmax(-1) == labels, mask))


@struct.dataclass
class ConfusionMatrix(Metric):
    """Counts of (true class, predicted class) pairs: ``counts[i, j]`` examples of class ``i``
    were predicted as ``j``. Make the class for ``n`` classes with ``for_classes(n)``.

    ``compute()`` is the float32 ``[n, n]`` count matrix; ``log_eval_metrics`` writes it as a
    table and an image. Counting is a one-hot product, so it compiles into an eval step.

    Examples:
        >>> Confusion = fx.metrics.ConfusionMatrix.for_classes(3)
        >>> logits = torch.eye(3)[torch.tensor([0, 2, 2, 1])]  # predictions 0, 2, 2, 1
        >>> Confusion.from_model_output(logits, torch.tensor([0, 1, 2, 1])).compute()
        tensor([[1., 0., 0.],
                [0., 1., 1.],
                [0., 0., 1.]])
    """

    counts: torch.Tensor
    num_classes = 0  # set by for_classes

    @classmethod
    def for_classes(cls, num_classes: int) -> type:
        """The ConfusionMatrix class for ``num_classes`` classes (cached per number)."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"ConfusionMatrix.for_classes: num_classes must be an int >= 2, "
                             f"got {num_classes!r}")
        return _confusion_class(num_classes)

    @classmethod
    def _classes(cls) -> int:
        if not cls.num_classes:
            raise TypeError("ConfusionMatrix needs its number of classes: use "
                            "fx.metrics.ConfusionMatrix.for_classes(n)")
        return cls.num_classes

    @classmethod
    def empty(cls, *, device=None, dtype=torch.float32):
        del dtype  # counts are int64
        n = cls._classes()
        return cls(torch.zeros((n, n), dtype=torch.int64, device=device))

    @classmethod
    def from_model_output(cls, logits, labels, mask=None, **unused):
        """Args: logits (..., classes); integer labels (...); mask, a prefix of labels.shape."""
        del unused
        n = cls._classes()
        if logits.shape[-1] != n or logits.shape[:-1] != labels.shape:
            raise ValueError(f"ConfusionMatrix({n}): logits {tuple(logits.shape)} must be labels' "
                             f"shape {tuple(labels.shape)} plus a class dimension of {n}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"ConfusionMatrix: labels must be integer class ids, got "
                            f"{labels.dtype}")
        keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else _masked(
            labels, mask)[1].reshape(labels.shape)
        # float matmul (CUDA has no int64 one), exact: a batch's counts stay far below 2**24
        true = torch.nn.functional.one_hot(labels.reshape(-1), n) * keep.reshape(-1, 1)
        pred = torch.nn.functional.one_hot(logits.argmax(-1).reshape(-1), n)
        return cls((true.T.float() @ pred.float()).round().long())

    def merge(self, other):
        self._check_same_type(other)
        return type(self)(self.counts + other.counts)

    def compute(self):
        return self.counts.to(torch.float32)


@functools.cache
def _confusion_class(num_classes: int) -> type:
    namespace = {"__annotations__": {}, "num_classes": num_classes, "__module__": __name__,
                 "__qualname__": f"ConfusionMatrix.for_classes({num_classes})",
                 "_recipe": (_confusion_class, num_classes)}
    return struct.dataclass(_Made("ConfusionMatrix", (ConfusionMatrix,), namespace))


@struct.dataclass
class Collection(Metric):
    """Several named metrics that are made, merged and computed together.

    Make a collection class with ``Collection.create(name=MetricClass, ...)``; every metric
    receives all model outputs and reads the ones it needs.
    """

    _metrics = {}  # name -> metric class; set by create()

    @classmethod
    def create(cls, **metrics: type) -> type:
        """A Collection class with one field per ``name=MetricClass`` (cached per arguments).

        Examples:
            >>> Metrics = fx.metrics.Collection.create(accuracy=fx.metrics.Accuracy,
            ...                                        loss=fx.metrics.Average.from_output("loss"))
            >>> m = Metrics.single_from_model_output(logits=torch.tensor([[1.0, 0.0]]),
            ...                                      labels=torch.tensor([0]),
            ...                                      loss=torch.tensor(0.25))
            >>> m.compute()
            {'accuracy': tensor(1.), 'loss': tensor(0.2500)}
        """
        for name, metric in metrics.items():
            if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
                raise ValueError(f"Collection.create: {name!r} is not a usable field name")
            if not (isinstance(metric, type) and issubclass(metric, Metric)):
                raise TypeError(f"Collection.create: {name}={metric!r} is not a Metric class")
        return _collection_class(tuple(metrics.items()))

    @classmethod
    def empty(cls, *, device=None, dtype=torch.float32):
        return cls(**{n: m.empty(device=device, dtype=dtype) for n, m in cls._metrics.items()})

    @classmethod
    def single_from_model_output(cls, **outputs):
        """Each metric's ``from_model_output(**outputs)``, as one Collection value."""
        return cls(**{n: m.from_model_output(**outputs) for n, m in cls._metrics.items()})

    from_model_output = single_from_model_output

    def merge(self, other):
        self._check_same_type(other)
        return type(self)(**{n: getattr(self, n).merge(getattr(other, n)) for n in self._metrics})

    def compute(self) -> dict[str, Any]:
        """A dict from each metric's name to its ``compute()``."""
        return {n: getattr(self, n).compute() for n in self._metrics}


@functools.cache
def _collection_class(items: tuple) -> type:
    fields = dict(items)
    title = ", ".join(f"{n}={m.__qualname__}" for n, m in items)
    namespace = {"__annotations__": fields, "_metrics": fields, "__module__": __name__,
                 "__qualname__": f"Collection.create({title})",
                 "_recipe": (_collection_class, items)}
    return struct.dataclass(_Made("Collection", (Collection,), namespace))


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
