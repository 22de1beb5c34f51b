"""Parameter groups: a transform per label (``multi_transform``), a transform on a subset
(``masked``), and frozen parameters (``set_to_zero``), with optax's names.

Parameters are a flat dict ``{name: tensor}``. Labels and masks are given by name: a dict, or a
predicate ``fn(name, param)`` as in ``adamw(mask=...)``. They are worked out in Python from the
names (and shapes) when the step is traced, so a compiled step stays one graph. Each group's
transform sees only its own parameters, and its state holds only theirs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

from ..tree import tree_zeros_like
from .base import GradientTransformation
from .masks import Labels, Mask, Tied, by_name, check, is_names, rebinding, with_tied

GroupMask = Mask


class MultiTransformState(NamedTuple):
    """The state ``multi_transform`` keeps between steps."""

    inner_states: dict[Hashable, Any]   # label -> that group's transform state


PartitionState = MultiTransformState
"""The state of ``partition``: ``multi_transform``'s (optax's newer name for it)."""


class MaskedState(NamedTuple):
    """The state ``masked`` keeps between steps."""

    inner_state: Any


def _groups(transforms: Mapping, param_labels: Labels, tree: Mapping) -> dict[Hashable, list]:
    labels = by_name(param_labels, tree, "multi_transform(param_labels=...)", names=False)
    groups: dict[Hashable, list] = {label: [] for label in transforms}
    unknown = {}
    for name, label in labels.items():
        if label in groups:
            groups[label].append(name)
        else:
            unknown.setdefault(label, []).append(name)
    if unknown:
        raise ValueError(f"multi_transform: labels with no transform: {unknown} (label: "
                         f"parameters); the transforms are {list(transforms)}")
    unused = [label for label, names in groups.items() if not names]
    if unused:
        raise ValueError(f"multi_transform: transforms that no parameter uses: {unused}; the "
                         f"parameters' labels are {sorted(set(map(str, labels.values())))}")
    return groups


def _subset(tree: Mapping | None, names: list[str]) -> dict | None:
    return None if tree is None else {name: tree[name] for name in names}


def multi_transform(transforms: Mapping[Hashable, GradientTransformation],
                    param_labels: Labels) -> GradientTransformation:
    """Applies a different transform to each group of parameters, chosen by a label.

    Each transform sees only the parameters with its label (its state holds only theirs); the
    state is ``MultiTransformState(inner_states)``, a dict from label to that transform's state.
    To freeze parameters, give them a label whose transform is ``set_to_zero()``: their updates
    are zero and no other transform (weight decay included) touches them.

    A label with no transform is a ValueError naming it and its parameters, as in optax; so is
    a transform that no parameter uses (optax allows it), which is most often a misspelt label.

    Args:
      transforms: a dict from label to the transform for the parameters with that label.
      param_labels: a dict ``{parameter name: label}`` covering every parameter, a predicate
        ``fn(name, param) -> label`` as in ``adamw(mask=...)``, or optax's
        ``fn(params) -> labels``. When ``update`` is called without params, the function sees
        each parameter's update in its place.

    Returns:
      A ``GradientTransformation`` whose state is a ``MultiTransformState``.

    Examples:
        Adam on the weights, plain SGD on the biases:

        >>> params = {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}
        >>> tx = fx.optim.multi_transform(
        ...     {"matrix": fx.optim.adam(0.1), "vector": fx.optim.sgd(0.5)},
        ...     lambda name, p: "matrix" if p.ndim == 2 else "vector")
        >>> state = tx.init(params)
        >>> list(state.inner_states)
        ['matrix', 'vector']
        >>> grads = {"0.weight": torch.full((2, 2), 3.0), "0.bias": torch.full((2,), 3.0)}
        >>> tx.update(grads, state, params)[0]
        {'0.weight': tensor([[-0.1000, -0.1000],
                [-0.1000, -0.1000]]), '0.bias': tensor([-1.5000, -1.5000])}

        Freezing the first layer: its parameters get zero updates, the rest AdamW's:

        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> tx = fx.optim.multi_transform(
        ...     {"train": fx.optim.adamw(1e-2), "frozen": fx.optim.set_to_zero()},
        ...     lambda name, p: "frozen" if name.startswith("0.") else "train")
        >>> state = fx.TrainState.create(model, tx)
        >>> grads = {k: torch.ones_like(v) for k, v in state.params.items()}
        >>> new = state.apply_gradients(grads)
        >>> [bool(torch.equal(new.params[k], state.params[k])) for k in state.params]
        [True, True, False, False]
    """
    if not transforms:
        raise ValueError("multi_transform needs at least one transform")
    check(param_labels, "multi_transform(param_labels=...)", names=False)

    def init(params):
        groups = _groups(transforms, param_labels, params)
        return MultiTransformState({label: transforms[label].init(_subset(params, names))
                                    for label, names in groups.items()})

    def update(updates, state, params=None):
        groups = _groups(transforms, param_labels, updates if params is None else params)
        if not isinstance(state, MultiTransformState) or list(state.inner_states) != list(groups):
            raise ValueError(f"multi_transform over labels {list(groups)} got a state of "
                             f"{type(state).__name__}; was it made by another optimizer?")
        out, inner_states = {}, {}
        for label, names in groups.items():
            out[label], inner_states[label] = transforms[label].update(
                _subset(updates, names), state.inner_states[label], _subset(params, names))
        merged = {name: group[name] for group in out.values() for name in group}
        return {name: merged[name] for name in updates}, MultiTransformState(inner_states)

    return GradientTransformation(init, update, rebinding(
        lambda groups: multi_transform({label: with_tied(t, groups)
                                        for label, t in transforms.items()}, param_labels),
        *transforms.values()))


def partition(transforms: Mapping[Hashable, GradientTransformation],
              param_labels: Labels) -> GradientTransformation:
    """optax's newer name for ``multi_transform``: the same transform.

    Args:
      transforms: a dict from label to the transform for the parameters with that label.
      param_labels: a dict ``{parameter name: label}`` or a predicate ``fn(name, param)``.

    Returns:
      ``multi_transform(transforms, param_labels)``.

    Examples:
        >>> tx = fx.optim.partition({"a": fx.optim.sgd(1.0), "b": fx.optim.set_to_zero()},
        ...                         {"w": "a", "v": "b"})
        >>> params = {"w": torch.ones(1), "v": torch.ones(1)}
        >>> tx.update({"w": torch.ones(1), "v": torch.ones(1)}, tx.init(params), params)[0]
        {'w': tensor([-1.]), 'v': tensor([0.])}
    """
    return multi_transform(transforms, param_labels)


def masked(inner: GradientTransformation, mask: GroupMask) -> GradientTransformation:
    """Applies ``inner`` to the parameters ``mask`` selects; the others' updates pass through.

    ``inner`` sees only the selected parameters; the state is ``MaskedState(inner_state)``. A
    mask that selects no parameter is a ValueError (optax allows it).

    Args:
      inner: the transform for the selected parameters.
      mask: a dict ``{parameter name: bool}`` covering every parameter, a predicate
        ``fn(name, param) -> bool`` as in ``adamw(mask=...)``, optax's ``fn(params) -> mask``,
        or the collection of names to select (see ``fxtrain.optim.masks``).

    Returns:
      A ``GradientTransformation`` whose state is a ``MaskedState``.

    Examples:
        Clip only the weight's updates; the bias's gradient passes through:

        >>> params = {"weight": torch.zeros(2), "bias": torch.zeros(2)}
        >>> tx = fx.optim.masked(fx.optim.clip(1.0), lambda name, p: name == "weight")
        >>> grads = {"weight": torch.tensor([3.0, -0.5]), "bias": torch.tensor([3.0, -0.5])}
        >>> tx.update(grads, tx.init(params), params)[0]
        {'weight': tensor([ 1.0000, -0.5000]), 'bias': tensor([ 3.0000, -0.5000])}
    """
    return _masked(inner, mask, ())


def _masked(inner: GradientTransformation, mask: GroupMask, tied: Tied) -> GradientTransformation:
    """``masked`` with its mask (and ``inner``'s) reading the tied names ``tied``."""
    check(mask, "masked(mask=...)")

    def selected(tree):
        flags = by_name(mask, tree, "masked(mask=...)", tied=tied)
        names = [name for name, flag in flags.items() if flag]
        if not names:
            raise ValueError(f"masked: the mask selects none of the parameters {list(flags)}; "
                             "leave the transform out instead")
        return names

    def init(params):
        return MaskedState(inner.init(_subset(params, selected(params))))

    def update(updates, state, params=None):
        names = selected(updates if params is None else params)
        if not isinstance(state, MaskedState):
            raise ValueError(f"masked got a state of {type(state).__name__}; was it made by "
                             "another optimizer?")
        changed, inner_state = inner.update(_subset(updates, names), state.inner_state,
                                            _subset(params, names))
        return {name: changed.get(name, u) for name, u in updates.items()}, MaskedState(inner_state)

    if is_names(mask):  # the mask and inner's read the tied names
        rebind = lambda groups: _masked(with_tied(inner, groups), mask, groups)  # noqa: E731
    else:
        rebind = rebinding(lambda groups: _masked(with_tied(inner, groups), mask, tied), inner)
    return GradientTransformation(init, update, rebind)


def set_to_zero() -> GradientTransformation:
    """Zero updates: the transform of frozen parameters.

    Freeze parameters with ``multi_transform({"train": adamw(...), "frozen": set_to_zero()},
    labels)`` (see ``multi_transform``); the frozen parameters stay bitwise unchanged.

    Returns:
      A stateless ``GradientTransformation`` (its state is None).

    Examples:
        >>> tx = fx.optim.set_to_zero()
        >>> tx.update({"w": torch.tensor([3.0, -4.0])}, tx.init(None))
        ({'w': tensor([0., 0.])}, None)
    """

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return tree_zeros_like(updates), state

    return GradientTransformation(init, update)
