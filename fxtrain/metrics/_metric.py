"""The ``Metric`` interface (``fx.metrics.Metric``) and how a factory-made metric class
pickles; ``metrics.py`` (the built-in metrics) and ``_torchmetrics.py`` (the torchmetrics
adaptor) both subclass it, so neither imports the other.
"""

from __future__ import annotations

import copyreg
import functools
from typing import Any

import torch

from .. import struct


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
