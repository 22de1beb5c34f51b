"""The optimizer update of ``fx.regional``'s blocks, a region per block too: traced and compiled
once, its graph run for every block.

A regional step's forward and backward are calls of one subgraph, but its update was the
outer graph's: AdamW's ops for every parameter of every layer, which Dynamo traced, AOTAutograd
and Inductor compiled again per layer (a 24-layer GPT-2's regional step: 3.4x the CPU seconds of
its 2-layer one, issue 62). Blocks of one class hold parameters of the same names and shapes, so
an ``ElementwiseTransformation`` (each parameter's update a function of its own gradient, state
and value, and of the state's scalars) updates each block alone, the same ops on the same
tensors: a region ``update(grads, opt_state, params) -> (params, opt_state, squared norms)``
over the block's parameters under their names within the block, traced and compiled once. The
other parameters (embeddings, a final norm) update in the outer graph as before, and the state
is put back together in its own order: the same bits as the update of the whole tree.

The plan is built eagerly, by ``fx.regional(state)`` (``built``), and held in the state's layout
as a value (``BlockUpdate``): the blocks and the parts the update goes through, each block's
layout (its parameters' names within it, the state's tree structure over them, the kinds of
its leaves), and the region itself, a function of its own that closes over the transformation
and those layouts. Nothing is registered in the process and nothing is probed while Dynamo
traces: the step reads the plan off the layout, and takes the update of the whole tree where
the state's transformation, parameters or state are not those the plan was built for (a
``state.replace(tx=...)`` after ``fx.regional``).

Dynamo reuses the first block's trace of the update for the others (``regions.nested``'s key:
the layout's number and the block's tensors' signatures). The region takes its tensors flat
and returns them flat: what torch reuses returns tensors only, and flat inputs spare Dynamo a
walk of the trees per block (torch's pytree, which it traces in Python, for the call's
fingerprint and again for the key): a 24-layer GPT-2's trace took 16.7 CPU-s with the trees,
13.5 flat.

Only where the update cannot tell the blocks apart: a mask by name (``adamw(mask=...)``) may
treat the same parameter of two blocks differently, and inside a region the block's names are
its own. ``built`` runs the update on small stand-ins, each block's under its full names and
under its names within the block, and plans the regions only where every block gives the bits
of the first (else the update stays in the outer graph).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import optim
from .._torch import regions
from ..tree import squared_norms

Blocks = tuple[tuple[str, tuple[str, ...]], ...]  # (block's prefix, its parameters' full names)


def blocks_of(params: Mapping[str, torch.Tensor], region_names: tuple[str, ...]) -> Blocks:
    """Each region's parameters, by full name, in the state's order (regions without any
    parameter left out)."""
    found = tuple((r, tuple(n for n in params if n.startswith(r + "."))) for r in region_names)
    return tuple((r, names) for r, names in found if names)


def _per_parameter(names: frozenset) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, dict) and len(x) > 0 and frozenset(x) == names


def _renamed(tree: Any, names: frozenset, pick: Mapping[str, str]) -> Any:
    """``tree`` with each dict keyed by the names ``names`` (a per-parameter part of an
    optimizer state) cut down to ``pick``'s entries, ``{new name: tree[old name]}``."""
    is_part = _per_parameter(names)
    return pytree.tree_map(lambda x: {k: x[old] for k, old in pick.items()} if is_part(x) else x,
                           tree, is_leaf=is_part)


def _split(tree: Any, names: frozenset) -> tuple[list, Any]:
    return pytree.tree_flatten(tree, is_leaf=_per_parameter(names))


def _update(tx: optim.GradientTransformation, grads: dict, opt_state: Any,
            params: dict) -> tuple[dict, Any, list]:
    updates, new_state = tx.update(grads, opt_state, params)
    return optim.apply_updates(params, updates), new_state, squared_norms(list(grads.values()))


def _layout_of(tx: optim.GradientTransformation, shapes: tuple, kinds: tuple) -> tuple | None:
    """A block's update layout: its parameters' names within it (``shapes``: with their
    dtypes), the tree spec of ``tx``'s state over them above its per-parameter parts, and the
    kinds of the state's leaves (``_kinds``); None where the state of the block alone would not
    have the leaves ``kinds`` says the whole state has (no region then)."""
    names = tuple(n for n, _ in shapes)
    params = {n: _stand_in(i, torch.empty((), dtype=d)) for i, (n, d) in enumerate(shapes)}
    leaves, spec = _split(tx.init(params), frozenset(params))
    if len(leaves) != len(kinds) or any(
            (k == "dict") != isinstance(x, dict) or (k == "tensor") != isinstance(x, torch.Tensor)
            for x, k in zip(leaves, kinds)):
        return None
    return names, spec, kinds


def _kinds(leaves: list) -> tuple | None:
    """Each leaf of the state (``_split``'s): "dict" (a per-parameter part), "tensor", or
    ``("value", x)`` for a plain value; None where a leaf is none of those."""
    kinds = []
    for x in leaves:
        if isinstance(x, dict):
            kinds.append("dict")
        elif isinstance(x, torch.Tensor):
            kinds.append("tensor")
        elif isinstance(x, (type(None), bool, int, float, str)):
            kinds.append(("value", x))
        else:
            return None
    return tuple(kinds)


def _region_of(tx: optim.GradientTransformation, layouts: tuple) -> Callable[..., list]:
    """The blocks' update by ``tx`` as a region (``_block_update``), for the block layouts
    ``layouts`` (``_layout_of``'s, by number)."""

    def key(layout: int, *flat: torch.Tensor) -> int:
        """The reuse key of a block's update (traced by Dynamo): the layout (names and state
        structure) and its tensors' signatures (the transformation: one in a step)."""
        return regions.flat_key(("update", layout), flat)

    @functools.partial(regions.nested, key=key)
    def block_update(layout: int, *flat: torch.Tensor) -> list:
        return _block_update(tx, layouts[layout], flat)

    return block_update


def _block_update(tx: optim.GradientTransformation, layout: tuple, flat: tuple) -> list:
    """A block's update by ``tx``, the body of its region: traced and compiled once, its calls
    of one key reusing the trace. Its tensors come flat (what spares Dynamo a walk of trees per
    block): the gradients, the parameters, then the state's (``_flat_inputs``), and leave flat
    (what torch's reuse takes): the new parameters, the new state's tensors in the same order,
    the squared norms."""
    names, spec, kinds = layout
    n = len(names)
    grads, params, rest = dict(zip(names, flat[:n])), dict(zip(names, flat[n:2 * n])), \
        iter(flat[2 * n:])
    leaves = [{k: next(rest) for k in names} if kind == "dict" else
              next(rest) if kind == "tensor" else kind[1] for kind in kinds]
    new, state, squared = _update(tx, grads, pytree.tree_unflatten(leaves, spec), params)
    out = [new[k] for k in names]
    for x in _split(state, frozenset(names))[0]:
        if isinstance(x, dict):
            out += [x[k] for k in names]
        elif isinstance(x, torch.Tensor):
            out.append(x)
    return out + squared


def _flat_inputs(grads: dict, params: dict, leaves: list, kinds: tuple,
                 pairs: tuple) -> list:
    """A block's tensors for ``_block_update``, by full name (``pairs``: (name within the
    block, full name))."""
    flat = [grads[n] for _, n in pairs] + [params[n] for _, n in pairs]
    for x, kind in zip(leaves, kinds):
        if kind == "dict":
            flat += [x[n] for _, n in pairs]
        elif kind == "tensor":
            flat.append(x)
    return flat


def _through_region(region: Callable, layout: int, flat: list, leaves: list, kinds: tuple,
                    pairs: tuple) -> tuple[dict, list, list]:
    """A block's update through its region: the new parameters and the new state's leaves
    by the block's names (a per-parameter part's; other tensors the block's; plain values as
    they were: an ``ElementwiseTransformation`` keeps them, ``name_free`` checks it), and the
    squared norms."""
    out = iter(region(layout, *flat))
    new = {k: next(out) for k, _ in pairs}
    got = [{k: next(out) for k, _ in pairs} if kind == "dict" else
           next(out) if kind == "tensor" else x for x, kind in zip(leaves, kinds)]
    return new, got, list(out)


def _stand_in(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((2,), 0.5 + 0.25 * i, dtype=like.dtype)


def name_free(tx: optim.GradientTransformation, shapes: tuple, blocks: Blocks) -> bool:
    """Whether ``tx`` updates each block alike, under its full names and under its names
    within the block (``shapes``: every parameter's name and dtype, in order): stand-ins of 2
    elements, the same values for a name within the block."""
    if not isinstance(tx, optim.ElementwiseTransformation):
        return False
    rel = {n: n[len(r) + 1:] for r, names in blocks for n in names}
    index = {k: i for i, k in enumerate(dict.fromkeys(rel.values()))}
    params = {n: _stand_in(index.get(rel.get(n), -1), torch.empty((), dtype=d)) for n, d in shapes}
    grads = {n: p * 0.5 - 1.0 for n, p in params.items()}
    with torch.no_grad():
        try:  # stand-ins the update cannot take (a hyperparameter on another device): no region
            _, state = tx.update(grads, tx.init(params), params)  # a second update: moments set
            got, after = tx.update(grads, state, params)
        except Exception:  # noqa: BLE001
            return False
        if not _keeps_structure(state, after):
            return False
        first = None
        for r, names in blocks:
            mine = {rel[n]: got[n] for n in names}
            try:  # a mask by name refuses the names within a block, as it should
                inside = _update(tx, {rel[n]: grads[n] for n in names},
                                 _renamed(state, frozenset(params), {rel[n]: n for n in names}),
                                 {rel[n]: params[n] for n in names})[0]
            except Exception:  # noqa: BLE001
                return False
            want = optim.apply_updates({k: params[r + "." + k] for k in mine}, mine)
            first = first or mine
            if mine.keys() != first.keys() or any(
                    not torch.equal(mine[k], first[k]) or not torch.equal(inside[k], want[k])
                    for k in mine):
                return False
    return True


def _keeps_structure(before: Any, after: Any) -> bool:
    """Whether an update kept its state's structure and non-tensor leaves (``_flat``)."""
    old, old_spec = pytree.tree_flatten(before)
    new, new_spec = pytree.tree_flatten(after)
    return old_spec == new_spec and all(
        isinstance(a, torch.Tensor) if isinstance(b, torch.Tensor) else a is b or a == b
        for a, b in zip(new, old))


def _parts(names: tuple[str, ...], region_names: tuple[str, ...]) -> tuple:
    """The blocks (``blocks_of``) and the parts the update goes through: each block's
    ``(prefix, ((name within the block, full name), ...))``, then the other parameters' under
    the prefix ""."""
    blocks = blocks_of(dict.fromkeys(names), region_names)
    inside = {n for _, b in blocks for n in b}
    parts = tuple((r, tuple((n[len(r) + 1:], n) for n in b)) for r, b in blocks)
    rest = tuple((n, n) for n in names if n not in inside)
    return blocks, parts + ((("", rest),) if rest else ())


@dataclasses.dataclass(frozen=True, eq=False)
class BlockUpdate:
    """The blocks' update planned by ``fx.regional`` (``built``), held in the state's layout.

    Attributes:
      tx: the transformation it was planned for.
      signature: each parameter's name, shape and dtype, in the state's order.
      kinds: the kinds of the optimizer state's leaves (``_kinds``).
      parts: the parts the update goes through (``_parts``).
      layout_of: each block's layout number (``layouts``), by its prefix.
      region: the blocks' update as a region (``_region_of``).
    """

    tx: Any
    signature: tuple
    kinds: tuple
    parts: tuple
    layout_of: Mapping[str, int]
    region: Callable

    def fits(self, state: Any) -> bool:
        """Whether ``state`` is what this update was planned for (its transformation, its
        parameters' names, shapes and dtypes, its state's kinds of leaves)."""
        return self.tx is state.tx and self.signature == _signature(state.params)


def _signature(params: Mapping[str, torch.Tensor]) -> tuple:
    found = []
    for n, p in params.items():  # a loop: Dynamo traces this in a step
        found.append((n, tuple(p.shape), p.dtype))
    return tuple(found)


def built(state: Any) -> BlockUpdate | None:
    """The blocks' update of a regional ``state`` (its layout's regions), planned eagerly: None
    where it cannot go through regions (fewer than two blocks with parameters, an update that
    tells the blocks apart or is not elementwise, a state whose leaves are not plain)."""
    blocks, parts = _parts(tuple(state.params), state.layout.regions)
    shapes = tuple((n, p.dtype) for n, p in state.params.items())
    if len(blocks) < 2 or not name_free(state.tx, shapes, blocks):
        return None
    kinds = _kinds(_split(state.opt_state, frozenset(state.params))[0])
    if kinds is None:
        return None
    layouts, layout_of = {}, {}
    for r, pairs in parts:
        if r:
            layout = _layout_of(state.tx, tuple((k, state.params[n].dtype)
                                                for k, n in pairs), kinds)
            if layout is None:
                return None
            layout_of[r] = layouts.setdefault(layout, len(layouts))
    return BlockUpdate(state.tx, _signature(state.params), kinds, parts, layout_of,
                       _region_of(state.tx, tuple(layouts)))


def applied(state: Any, grads: dict[str, torch.Tensor]) -> tuple[Any, list] | None:
    """``state.apply_gradients(grads)`` with each block's update a call of one region (the
    layout's ``BlockUpdate``), and the gradients' squared norms (in the order of ``grads``);
    None where the layout holds no plan, or one for another transformation or parameters."""
    plan = state.layout.block_update
    if plan is None or not plan.fits(state):
        return None
    leaves, spec = _split(state.opt_state, frozenset(state.params))
    kinds = _kinds(leaves)
    if kinds != plan.kinds:
        return None
    out = [{} if isinstance(x, dict) else x for x in leaves]  # dicts: per-parameter parts
    new, squared = {}, {}
    for r, pairs in plan.parts:
        pick = dict(pairs)
        if r:
            flat = _flat_inputs(grads, state.params, leaves, kinds, pairs)
            params, got, sq = _through_region(plan.region, plan.layout_of[r], flat, leaves,
                                              kinds, pairs)
            _put(out, got, pick)
        else:
            part = pytree.tree_unflatten(
                [{k: x[n] for k, n in pairs} if isinstance(x, dict) else x for x in leaves],
                spec)
            params, opt_state, sq = _update(state.tx, {k: grads[n] for k, n in pairs}, part,
                                            {k: state.params[n] for k, n in pairs})
            _merge(out, opt_state, pick)
        new.update({n: params[k] for k, n in pairs})
        squared.update(zip(pick.values(), sq))
    opt_state = pytree.tree_unflatten(
        [{n: x[n] for n in state.params} if isinstance(x, dict) else x for x in out], spec)
    return (state.replace(step=state.step + 1, params={n: new[n] for n in state.params},
                          opt_state=opt_state), [squared[n] for n in grads])


def _put(out: list, got: list, pick: Mapping[str, str]) -> None:
    """Adds a part's new state leaves (``_through_region``'s) into the whole's ``out``."""
    for i, x in enumerate(got):
        if isinstance(out[i], dict):
            out[i].update({pick[k]: v for k, v in x.items()})
        else:
            out[i] = x


def _merge(out: list, part: Any, pick: Mapping[str, str]) -> None:
    """Adds the new optimizer state of a part (``pick``: its names to full names) into the
    whole's leaves ``out``: per-parameter dicts by full name; other leaves (a step count, the
    same in every part) the part's."""
    got, got_spec = _split(part, frozenset(pick))
    if len(got) != len(out):
        raise RuntimeError(f"an ElementwiseTransformation's state changed its structure in an "
                           f"update (to {got_spec}); make the transformation a plain "
                           f"GradientTransformation")
    for i, x in enumerate(got):
        if isinstance(out[i], dict):
            out[i].update({pick[k]: v for k, v in x.items()})
        else:
            out[i] = x
