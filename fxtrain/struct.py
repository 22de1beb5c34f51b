"""Frozen dataclasses that are pytrees for torch's pytree and for optree.

A ``@struct.dataclass`` class is an immutable value: its data fields are pytree children, its
``field(static=True)`` fields are part of the tree structure (never leaves), and ``replace``
returns a new value. Registration with torch's pytree is what Dynamo traces inside compiled
code; registration with optree (namespace ``"fxtrain"``) serves host-side utilities.

Examples:
    >>> from fxtrain import struct
    >>> @struct.dataclass
    ... class Point:
    ...     x: torch.Tensor
    ...     label: str = struct.field(static=True, default="p")
    >>> p = Point(torch.zeros(()))
    >>> q = p.replace(x=torch.ones(()))
    >>> p.x, q.x, q.label
    (tensor(0.), tensor(1.), 'p')
    >>> torch.utils._pytree.tree_leaves(q)
    [tensor(1.)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = ["dataclass", "field", "OPTREE_NAMESPACE"]

OPTREE_NAMESPACE = "fxtrain"
"""The optree namespace fxtrain's dataclasses are registered in."""
T = TypeVar("T")


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; ``static=True`` makes it part of the tree structure, not a leaf.

    Examples:
        >>> from fxtrain import struct
        >>> @struct.dataclass
        ... class Scaled:
        ...     value: torch.Tensor
        ...     factor: float = struct.field(static=True, default=2.0)
        >>> torch.utils._pytree.tree_leaves(Scaled(torch.ones(2)))
        [tensor([1., 1.])]
    """
    metadata = {**kwargs.pop("metadata", {}), "static": static}
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self: T, **changes: Any) -> T:
    """Returns a copy with ``changes`` applied; the original is never mutated.

    Copies the fields by name rather than calling ``dataclasses.replace``: inside compiled code
    that keeps Dynamo's guards to one tuple instead of every field's metadata.
    """
    cls = type(self)
    if not changes.keys() <= cls.__struct_field_set__:
        unknown = changes.keys() - cls.__struct_field_set__
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    obj = object.__new__(cls)
    if torch.compiler.is_compiling():
        for name in cls.__struct_fields__:
            object.__setattr__(obj, name, changes[name] if name in changes else getattr(self, name))
    else:  # on the host, per step in the loop: a dict copy is several times faster
        fields = obj.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
    return obj


def dataclass(cls: type[T] | None = None, *, kw_only: bool = False) -> Any:
    """Makes ``cls`` a frozen dataclass registered as a pytree node with torch and optree.

    Examples:
        >>> from fxtrain import struct
        >>> @struct.dataclass
        ... class Counter:
        ...     count: torch.Tensor
        >>> c = Counter(torch.tensor(0))
        >>> c.replace(count=c.count + 1)
        Counter(count=tensor(1))
        >>> c.count = 1
        Traceback (most recent call last):
            ...
        dataclasses.FrozenInstanceError: cannot assign to field 'count'
    """
    if cls is None:
        return lambda c: dataclass(c, kw_only=kw_only)
    cls = dataclasses.dataclass(frozen=True, kw_only=kw_only)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))

    def flatten(obj):
        return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

    def unflatten(children, static_values):
        obj = object.__new__(cls)
        for name, value in zip(data, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta, static_values):
            object.__setattr__(obj, name, value)
        return obj

    def flatten_with_keys(obj):
        children, context = flatten(obj)
        return [(torch_pytree.GetAttrKey(n), c) for n, c in zip(data, children)], context

    torch_pytree.register_pytree_node(
        cls,
        flatten,
        lambda children, context: unflatten(children, context),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    optree.register_pytree_node(
        cls,
        lambda obj: (*flatten(obj), data),
        lambda context, children: unflatten(children, context),
        path_entry_type=optree.GetAttrEntry,
        namespace=OPTREE_NAMESPACE,
    )
    cls.__struct_fields__ = data + meta
    cls.__struct_field_set__ = frozenset(data + meta)
    cls.replace = _replace
    return cls
