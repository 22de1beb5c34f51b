"""Metric values in the style of clu's ``metrics``: frozen pytrees that merge.

A metric is a small frozen value of tensors. ``from_model_output(**outputs)`` makes one from a
batch, ``merge`` adds two together, ``compute`` turns the sums into the number. Every leaf is a
tensor and ``empty()`` has the same structure and dtypes as a real value, so metrics leave a
``torch.compile(fullgraph=True)`` eval step and merge on the device with no host sync and no
recompiles. Accumulators are float32 (float64 for float64 inputs); counts are int64. To merge
inside a compiled step on an accelerator, start from ``empty(device=...)`` on that device.
The ``Metric`` interface lives in ``_metric.py``, ``from_torchmetrics`` (a torchmetrics metric as
one of these) in ``_torchmetrics.py``; ``fx.metrics`` exports all of them.

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

import functools
import keyword
from typing import Any

import torch

from .. import struct
from ._metric import Metric, _Made


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
