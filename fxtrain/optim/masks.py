"""Masks and labels by parameter name: what ``adamw(mask=...)``, ``masked`` and
``multi_transform`` take, checked against the parameters when the optimizer state is made
(``TrainState.create``), not at the first step.

A spec is one of

- a predicate ``fn(name, param)`` (fxtrain's form), or optax's ``fn(params) -> dict``;
- a dict ``{name: value}`` covering every parameter;
- for masks only, the collection of names to select (a list, tuple or set of str, such as
  transformers' ``get_decay_parameter_names(model)`` returns).

Parameters are a flat dict ``{name: tensor}``, as ``TrainState.params`` is. A collection of
names may name either of two tied names where the transformation was made with them
(``with_tied``: ``TrainState.create`` does, from its layout), an argument, never a context.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Hashable, Mapping
from typing import Any

import torch

Mask = Callable[..., Any] | Mapping[str, bool] | Collection[str] | None
Labels = Mapping[str, Hashable] | Callable[..., Any]

_FIX = ("pass a dict with an entry for every parameter, a predicate fn(name, param), or (for a "
        "mask) the collection of names to select")


Tied = tuple[tuple[str, ...], ...]
"""Groups of names of one tensor (``state.layout.tied``): a GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``, which the state keeps once, under the first name."""


def with_tied(tx: Any, groups: Tied) -> Any:
    """``tx`` with every name mask in it (``adamw(mask=names)``, ``masked``, ...) reading the
    tied names ``groups``, so that a collection of names may name either of two tied names
    (transformers' ``get_decay_parameter_names`` lists the LM head, which the state keeps under
    the embedding's name). ``TrainState.create`` makes its state's transformation so, from the
    layout's tied names: a value, resolved once, the same wherever it is called. ``tx`` itself
    where there are no tied names or no name mask (its ``with_tied`` is None).

    Examples:
        >>> params = {"wte.weight": torch.zeros(2), "ln.bias": torch.zeros(2)}
        >>> tx = fx.optim.add_decayed_weights(0.5, mask=["lm_head.weight"])
        >>> tied = fx.optim.masks.with_tied(tx, (("wte.weight", "lm_head.weight"),))
        >>> tied.update({k: torch.ones(2) for k in params}, tied.init(params), params)[0]
        {'wte.weight': tensor([1., 1.]), 'ln.bias': tensor([1., 1.])}
        >>> fx.optim.masks.with_tied(fx.optim.sgd(0.1), (("a", "b"),)).with_tied is None
        True
    """
    rebind = getattr(tx, "with_tied", None)
    return tx if not groups or rebind is None else rebind(tuple(groups))


def rebinding(build: Callable[[Tied], Any], *inner: Any) -> Callable[[Tied], Any] | None:
    """A wrapper's ``with_tied``: ``build(groups)``, the wrapper made again around
    ``with_tied(t, groups)`` of its ``inner`` transformations; None where none of them holds a
    name mask (so ``with_tied`` leaves the wrapper as it is)."""
    return build if any(getattr(t, "with_tied", None) is not None for t in inner) else None


def _kept_name(name: str, tree: Mapping, tied: Tied) -> str:
    """``name``, or the name ``tree`` keeps its tied tensor under (``with_tied``)."""
    if name in tree or not tied:
        return name
    group = next((names for names in tied if name in names), ())
    return next((other for other in sorted(group) if other in tree), name)


def is_names(spec: Any) -> bool:
    """Whether ``spec`` is a collection of names (the one kind of mask that reads tied names)."""
    return isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in spec)


def check(spec: Any, what: str, *, names: bool = True) -> None:
    """Refuses at once what can never be a spec (a string, a number, a list of non-names)."""
    if isinstance(spec, Mapping) or callable(spec) or (names and is_names(spec)):
        return
    kinds = "a dict, a predicate fn(name, param) or a collection of names" if names else \
        "a dict or a predicate fn(name, param)"
    raise TypeError(f"{what} must be {kinds}, got {type(spec).__name__} {spec!r:.80}")


def _takes_params_only(fn: Callable) -> bool:
    """Whether ``fn`` is optax's ``fn(params)`` rather than ``fn(name, param)``."""
    try:
        positional = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      and p.default is p.empty]
    except (TypeError, ValueError):  # no signature to read (a builtin): the documented form
        return False
    return len(positional) == 1


def by_name(spec: Any, tree: Mapping[str, torch.Tensor], what: str, *,
            names: bool = True, tied: Tied = ()) -> dict[str, Any]:
    """``{name: spec's value for name}`` over ``tree``'s names, or a clear error: a dict that
    misses parameters or names others, names that are no parameter's, optax's ``fn(params)``
    that returns no such dict. ``names``: a collection of names selects those (masks), a name
    of a ``tied`` group standing for the one of its group that ``tree`` keeps.

    Examples:
        >>> params = {"wte.weight": torch.zeros(2), "ln.bias": torch.zeros(2)}
        >>> by_name(["lm_head.weight"], params, "mask", tied=(("wte.weight", "lm_head.weight"),))
        {'wte.weight': True, 'ln.bias': False}
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} needs the parameters as a flat dict of tensors, got "
                        f"{type(tree).__name__}")
    check(spec, what, names=names)
    if callable(spec) and not isinstance(spec, Mapping):
        if not _takes_params_only(spec):
            return {name: spec(name, leaf) for name, leaf in tree.items()}
        spec = spec(dict(tree))  # optax's form: the mask or labels of all the parameters
        if not isinstance(spec, Mapping):
            raise TypeError(f"{what}: fn(params) returned {type(spec).__name__}; it must return "
                            "a dict {name: value} over the parameters")
    if names and is_names(spec):
        spec = {_kept_name(name, tree, tied) for name in spec}
        unknown = sorted(set(spec) - set(tree))
        if unknown:
            raise ValueError(f"{what}: {len(unknown)} names are no parameter's: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}; the parameters are "
                             f"{_few(tree)} (a state keeps tied tensors once; TrainState.create "
                             "resolves their other names: a transformation given to "
                             "state.replace(tx=...) does through fx.optim.masks.with_tied(tx, "
                             "state.layout.tied))")
        return {name: name in spec for name in tree}
    missing = [name for name in tree if name not in spec]
    unknown = [name for name in spec if name not in tree]
    if missing or unknown:
        raise ValueError(f"{what}: the dict does not match the parameters; parameters with no "
                         f"entry: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)}), entries for no parameter: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)}); {_FIX}")
    return {name: spec[name] for name in tree}


def _few(tree: Mapping) -> str:
    names = list(tree)
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"
