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

Dynamo reuses the first block's trace of the update for the others (``regions.nested``'s key:
the transformation and the block's tensors' signatures). What torch reuses returns tensors
only, so the region returns them flat and ``_through_region`` puts them back by position; the
state's parts per block are constants computed while Dynamo traces (``_parts``), so the step's
trace does not walk every name per block.

Only where the update cannot tell the blocks apart: a mask by name (``adamw(mask=...)``) may
treat the same parameter of two blocks differently, and inside a region the block's names are
its own. While Dynamo traces, ``name_free`` runs the update for real on small stand-ins, each
block's under its full names and under its names within the block, and takes the regions only
where every block gives the bits of the first (else the update stays in the outer graph).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from .. import optim
from .._torch import regions
from .._torch.traced_errors import run_while_tracing
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


_TXS: list = []  # the transformations whose blocks' updates were traced, by ``_tx_index``


@run_while_tracing
def _tx_index(tx: optim.GradientTransformation) -> int:
    """``tx``'s place in ``_TXS`` (run for real while Dynamo traces): a region's argument
    must be a tensor or a constant, and Dynamo does not trace a region made while it traces."""
    if tx not in _TXS:
        _TXS.append(tx)
    return _TXS.index(tx)


def _indexed_key(index: int, grads: dict, opt_state: Any, params: dict) -> int:
    """The reuse key of a block's update (traced by Dynamo): ``tx`` (one in a step) and its
    tensors' names and signatures (its state's structure follows from the names)."""
    return regions.key_of(("update", index, regions.signature(grads),
                           regions.signature(params), regions.signature(opt_state)))


@functools.partial(regions.nested, key=_indexed_key)
def _block_update(index: int, grads: dict, opt_state: Any, params: dict) -> list:
    """A block's update by ``_TXS[index]``: a region traced and compiled once, its calls of
    one key reusing the trace. Its tensors, flat (what torch's reuse takes): the new
    parameters, the new state's leaves (a per-parameter part's in the order of ``params``),
    the squared norms."""
    new, state, squared = _update(_TXS[index], grads, opt_state, params)
    leaves, _ = _split(state, frozenset(params))
    flat = [v for x in leaves for v in ([x[k] for k in params] if isinstance(x, dict) else [x])]
    return [new[k] for k in params] + [x for x in flat if isinstance(x, torch.Tensor)] + squared


def _through_region(tx: optim.GradientTransformation, grads: dict, opt_state: Any,
                    params: dict, like: list) -> tuple[dict, list, list]:
    """``_update`` of a block through its region: the new parameters, the new state's leaves
    in the places of ``like`` (the whole state's, ``_split``: a per-parameter part's tensors
    by the block's names; other tensors the block's; anything else as it was: an
    ``ElementwiseTransformation`` keeps them, ``name_free`` checks it), and the squared
    norms. No tree is walked per block in the trace (Dynamo traces torch's pytree in Python)."""
    index = _tx_index(tx) + 0  # a constant without the source Dynamo cannot guard on
    out = iter(_block_update(index, grads, opt_state, params))
    new = {k: next(out) for k in params}
    leaves = [{k: next(out) for k in params} if isinstance(x, dict) else
              next(out) if isinstance(x, torch.Tensor) else x for x in like]
    return new, leaves, list(out)


def _stand_in(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((2,), 0.5 + 0.25 * i, dtype=like.dtype)


@run_while_tracing
def name_free(tx: optim.GradientTransformation, shapes: tuple, blocks: Blocks) -> bool:
    """Whether ``tx`` updates each block alike, under its full names and under its names
    within the block (run for real while Dynamo traces; ``shapes``: every parameter's name and
    dtype, in order): stand-ins of 2 elements, the same values for a name within the block."""
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


@run_while_tracing
def _parts(names: tuple[str, ...], region_names: tuple[str, ...]) -> tuple:
    """The blocks (``blocks_of``) and the parts the update goes through: each block's
    ``(prefix, ((name within the block, full name), ...))``, then the other parameters' under
    the prefix "" (run for real while Dynamo traces: constants, not a walk over every name
    per block in the trace)."""
    blocks = blocks_of(dict.fromkeys(names), region_names)
    inside = {n for _, b in blocks for n in b}
    parts = tuple((r, tuple((n[len(r) + 1:], n) for n in b)) for r, b in blocks)
    rest = tuple((n, n) for n in names if n not in inside)
    return blocks, parts + ((("", rest),) if rest else ())


def applied(state: Any, grads: dict[str, torch.Tensor]) -> tuple[Any, list] | None:
    """``state.apply_gradients(grads)`` with each block's update a call of one region, and
    the gradients' squared norms (in the order of ``grads``); None where the update cannot go
    through regions (see the module)."""
    blocks, parts = _parts(tuple(state.params), state.layout.regions)
    shapes = tuple((n, p.dtype) for n, p in state.params.items())
    with optim.masks.tied(state.layout.tied):
        if len(blocks) < 2 or not name_free(state.tx, shapes, blocks):
            return None
    leaves, spec = _split(state.opt_state, frozenset(state.params))
    out = [{} if isinstance(x, dict) else x for x in leaves]  # dicts: per-parameter parts
    new, squared = {}, {}
    with optim.masks.tied(state.layout.tied):
        for r, pairs in parts:
            pick = dict(pairs)
            part = pytree.tree_unflatten(
                [{k: x[n] for k, n in pairs} if isinstance(x, dict) else x for x in leaves], spec)
            block = ({k: grads[n] for k, n in pairs}, part, {k: state.params[n] for k, n in pairs})
            if r:
                params, got, sq = _through_region(state.tx, *block, leaves)
                _put(out, got, pick)
            else:
                params, opt_state, sq = _update(state.tx, *block)
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
