"""An eager Adam(W) or SGD update and its application in one pass of ``torch._foreach_*`` ops.

The composable update (``scale_by_adam``, then the weight decay, then the learning rate, then
``apply_updates``) runs some 14 elementwise passes over each parameter and allocates several
temporaries. ``torch.optim.AdamW(foreach=True)`` runs 8 (7 without a weight decay), over
lists of tensors grouped by device and dtype. An eager step (``TrainState.apply_gradients``
outside ``torch.compile``) of ``fx.optim.adamw`` or ``fx.optim.adam`` runs as many
(``fxtrain._torch.foreach.adam``): ``torch.optim``'s ops in its order, its scalars 0-d tensors
on the parameters' device as its ``capturable=True`` keeps them, so that no scalar is read on
the host (the step count and a scheduled learning rate stay tensors), and a donated step
writes into the state it was given.

The arithmetic is not the composable update's: ``b2 v + (1 - b2) g^2`` is one ``addcmul``
(fused multiply-adds where the CPU's vector unit has them), AdamW's decay multiplies the
parameters by ``1 - lr wd`` first, and the step size divides the denominator. The two agree to
a few float32 roundings per step, and with ``torch.optim``'s own to as many
(``tests/unit/test_fused_adam.py`` states the bound). Compiled, Inductor fuses the composable
update into one kernel per parameter by itself, and this path is not taken.

Each fused update takes only the state of its own chain, whose last state is
``scale_by_learning_rate``'s: another chain's (another length, another kind of tree) gets None,
and the composable update, which names the mismatch.

``fx.optim.sgd`` (momentum, Nesterov, L2 decay) runs fused too (``fxtrain._torch.foreach.sgd``),
in ``torch.optim.SGD(foreach=True)``'s operations: its ``add(..., alpha=x)`` is one fused
multiply-add where the composable update rounds ``x b`` first, so the two agree to a rounding
of each a step (``tests/unit/test_fused_sgd.py`` states the bound).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._torch import foreach
from ..distributed import is_sharded
from ..donation import written_into
from ._on_shards import _any_requires_grad, _laid_out_alike, _wrapped, locally
from .base import (ElementwiseTransformation, Fused, GradientTransformation, InPlace,
                   Params, WeightedTransformation, _local, writable)
from .transforms import (ScaleByAdamState, ScaleByLearningRateState, ScaleByLionState,
                         ScaleByRmsState, TraceState, _bias_correction, _wide)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _groups(params: dict, others: tuple[dict, ...], kind: Callable[[str], Any] = lambda k: None
            ) -> list[tuple] | None:
    """The leaves grouped as ``torch.optim`` groups them (device and dtype), and by
    ``kind(name)``: per group ``(kind, names, params, *others)``, ``others`` being the dicts of
    the leaves' companions (gradients, moments, traces), name by name; None where a leaf is not
    a real floating tensor, or a companion is not of its parameter's dtype, device and shape,
    or two names share one tensor (tied, and not kept once)."""
    if len({id(p) for p in params.values()}) != len(params):
        return None
    groups: dict[tuple, tuple[list, ...]] = {}
    for k, p in params.items():
        companions = tuple(other[k] for other in others)
        if not (isinstance(p, torch.Tensor) and p.is_floating_point() and all(
                isinstance(x, torch.Tensor) and x.dtype == p.dtype and x.device == p.device
                and x.shape == p.shape for x in companions)):
            return None
        group = groups.setdefault((p.device, p.dtype, kind(k)),
                                  tuple([] for _ in range(2 + len(others))))
        for into, x in zip(group, (k, p, *companions)):
            into.append(x)
    return [(key[2], *lists) for key, lists in groups.items()]


def _of_chain(opt_state: Any, kinds: dict[int | None, type], rate_at: int) -> bool:
    """Whether ``opt_state`` is the state of the chain the fused update was made for: as many
    states, the learning rate's last, and those of ``kinds`` (place: class; a None place left
    out) where they belong."""
    return (isinstance(opt_state, tuple) and len(opt_state) == rate_at + 1
            and isinstance(opt_state[rate_at], ScaleByLearningRateState)
            and all(isinstance(opt_state[at], kind) for at, kind in kinds.items()
                    if at is not None))


def _rate(learning_rate: Any, rate: Any) -> Any:
    """This step's learning rate: a schedule's at ``rate.count``, or the number."""
    return learning_rate(rate.count) if callable(learning_rate) else learning_rate


def _stepped(opt_state: tuple, replaced: dict[int, Any], rate_at: int, lr: Any,
             donated: bool) -> tuple:
    """The chain's new state: ``opt_state`` with the states of ``replaced`` at their places and
    ``scale_by_learning_rate``'s (at ``rate_at``) counted on, holding ``lr`` as float32;
    written into ``opt_state`` where ``donated``."""
    rate = opt_state[rate_at]
    lr_t = lr.to(torch.float32) if isinstance(lr, torch.Tensor) else torch.full_like(
        rate.learning_rate, lr)
    new_state = list(opt_state)
    for at, state in replaced.items():
        new_state[at] = state
    new_state[rate_at] = rate._replace(count=rate.count + 1, learning_rate=lr_t)
    new_state = tuple(new_state)
    return written_into(opt_state, new_state) if donated else new_state


def _scalars(lr: Any, count: torch.Tensor, like: torch.Tensor, b1: float, b2: float,
             wd: float, decoupled: bool) -> dict:
    """One step's scalars for the leaves of ``like``'s device and dtype, as 0-d tensors there
    (no host read): ``sqrt(1 - b2^t)``, the step size ``-lr / (1 - b1^t)`` and, for AdamW's
    decay, the factor ``1 - lr wd`` applied to the leaves that decay, computed in float64
    (``_bias_correction``, as the composable update does) and rounded to the leaves' dtype
    once."""
    wide = _wide(like.device)
    lr = lr.to(device=like.device, dtype=wide) if isinstance(lr, torch.Tensor) else \
        torch.tensor(lr, dtype=wide, device=like.device)  # a float: not rounded to float32
    bc1, bc2 = _bias_correction(b1, count, like), _bias_correction(b2, count, like)
    return {"decay": (1 - lr * wd).to(like.dtype) if wd and decoupled else None,
            "bc2_sqrt": torch.sqrt(bc2).to(like.dtype), "step_size": (-lr / bc1).to(like.dtype)}


def fused_adam(learning_rate: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any,
               decays: Callable[[Mapping], dict[str, bool]], *, decoupled: bool,
               adam_at: int, rate_at: int) -> Fused | None:
    """The fused eager update of an Adam chain whose ``scale_by_adam`` state sits at
    ``adam_at`` of the chain's state and ``scale_by_learning_rate``'s at ``rate_at``;
    ``decoupled``: AdamW's decay (``p <- p (1 - lr wd)``) rather than Adam's L2 (``g <- g + wd
    p``). None (no fused update) where a hyperparameter other than the learning rate is a
    tensor (``inject_hyperparams``): those stay on the composable path."""
    if not all(_number(x) for x in (b1, b2, eps, weight_decay)):
        return None
    b1, b2, eps, wd = float(b1), float(b2), float(eps), float(weight_decay)

    def fused(grads, opt_state, params, donated):
        if not (isinstance(params, dict) and isinstance(grads, dict) and params
                and _of_chain(opt_state, {adam_at: ScaleByAdamState}, rate_at)):
            return None
        adam, rate = opt_state[adam_at], opt_state[rate_at]
        if not (isinstance(adam.mu, dict) and adam.mu.keys() == params.keys() == grads.keys()):
            return None
        decay_of = decays(params) if wd else {}
        groups = _groups(params, (grads, adam.mu, adam.nu), lambda k: decay_of.get(k, False))
        if groups is None:
            return None
        lr = _rate(learning_rate, rate)
        count = adam.count + 1
        new_p, new_m, new_v = {}, {}, {}
        scalars: dict[tuple, dict] = {}  # once per device and dtype, for both decay groups
        for decay, names, p, g, m, v in groups:
            key = (p[0].device, p[0].dtype)
            if key not in scalars:
                scalars[key] = _scalars(lr, count, p[0], b1, b2, wd, decoupled)
            p, m, v = foreach.adam(p, g, m, v, b1=b1, b2=b2, eps=eps,
                                   l2=0.0 if decoupled or not decay else wd, into=donated,
                                   **{**scalars[key], "decay": scalars[key]["decay"] if decay
                                      else None})
            for into, new in ((new_p, p), (new_m, m), (new_v, v)):
                into.update(zip(names, new))
        # the moments in their own order (a state's dicts may be ordered apart from the
        # parameters': a donated state is written into by position)
        adam = adam._replace(count=count, mu={k: new_m[k] for k in adam.mu},
                             nu={k: new_v[k] for k in adam.nu})
        return ({k: new_p[k] for k in params},
                _stepped(opt_state, {adam_at: adam}, rate_at, lr, donated))

    return fused


def apply_fused(tx: GradientTransformation, grads: Any, opt_state: Any, params: Params,
                weight: Any, in_place: InPlace | None) -> tuple[Params, Any] | None:
    """``tx``'s update applied to ``params`` in one fused pass (``tx.fused``): the new
    parameters and optimizer state, for an eager step (the caller's to tell: compiled,
    Inductor fuses the composable update); on a sharded state's local shards, wrapped back
    with their layouts. None where it does not apply: no fused update,
    a weight for a weighted transformation, anything needing a gradient (an update being
    differentiated), a sharded state whose gradients are laid out otherwise or whose mask may
    read a parameter's shape. ``in_place``: the caller gives ``params`` and ``opt_state`` up."""
    if (tx.fused is None
            or (weight is not None and isinstance(tx, WeightedTransformation))
            or _any_requires_grad(grads, opt_state, params)):
        return None
    if is_sharded(params) and not (isinstance(tx, ElementwiseTransformation)
                                   and _laid_out_alike(grads, params)):
        return None
    donated = writable(opt_state, in_place) and in_place.params is params

    def update(local_state):
        local_params = {k: _local(p) for k, p in params.items()} if isinstance(params, dict) \
            else params
        out = tx.fused({k: _local(g) for k, g in grads.items()} if isinstance(grads, dict)
                       else grads, local_state, local_params, donated)
        if out is None:
            return None
        new_params, new_state = out
        return {k: _wrapped(p, params[k], local_params[k]) for k, p in new_params.items()}, \
            new_state

    return locally(opt_state, update, "a fused update")


def fused_sgd(learning_rate: Any, momentum: Any, nesterov: bool, weight_decay: Any, *,
              trace_at: int | None, rate_at: int) -> Fused | None:
    """The fused eager update of an SGD chain (``fx.optim.sgd``) whose ``trace`` state sits at
    ``trace_at`` of the chain's state (None without momentum) and ``scale_by_learning_rate``'s
    at ``rate_at``. None (no fused update) where the momentum or the decay is a tensor
    (``inject_hyperparams``): those stay on the composable path."""
    if not all(_number(x) for x in (momentum, weight_decay)):
        return None
    momentum, wd = float(momentum), float(weight_decay)

    def fused(grads, opt_state, params, donated):
        if not (isinstance(params, dict) and isinstance(grads, dict) and params
                and params.keys() == grads.keys()
                and _of_chain(opt_state, {trace_at: TraceState}, rate_at)):
            return None
        rate = opt_state[rate_at]
        trace = opt_state[trace_at].trace if trace_at is not None else None
        if trace is not None and not (isinstance(trace, dict) and trace.keys() == params.keys()):
            return None
        groups = _groups(params, (grads,) if trace is None else (grads, trace))
        if groups is None:
            return None
        lr = _rate(learning_rate, rate)
        new_p, new_t = {}, {}
        for _, names, p, g, *t in groups:
            t = t[0] if t else None
            p, t = foreach.sgd(p, g, t, weight_decay=wd, momentum=momentum, nesterov=nesterov,
                               lr=_lr_for(lr, p[0]), into=donated)
            new_p.update(zip(names, p))
            if t is not None:
                new_t.update(zip(names, t))
        # the trace in its own order (a donated state is written into by position)
        replaced = {} if trace_at is None else {
            trace_at: opt_state[trace_at]._replace(trace={k: new_t[k] for k in trace})}
        return {k: new_p[k] for k in params}, _stepped(opt_state, replaced, rate_at, lr, donated)

    return fused


def _lr_for(lr: Any, like: torch.Tensor) -> Any:
    """The learning rate as ``foreach`` takes it for leaves like ``like``: a float as it is, a
    tensor (a schedule's) on their device in their dtype."""
    return lr.to(device=like.device, dtype=like.dtype) if isinstance(lr, torch.Tensor) else lr


def fused_rmsprop(learning_rate: Any, decay: Any, eps: Any, momentum: Any, centered: bool,
                  weight_decay: Any, *, rms_at: int, trace_at: int | None,
                  rate_at: int) -> Fused | None:
    """The fused eager update of an RMSprop chain (``fx.optim.rmsprop``) whose
    ``scale_by_rms`` state sits at ``rms_at``, its ``trace`` at ``trace_at`` (None without
    momentum) and ``scale_by_learning_rate``'s at ``rate_at``: ``torch.optim.RMSprop``'s
    operations (``fxtrain._torch.foreach.rmsprop``). None where a hyperparameter other than
    the learning rate is a tensor."""
    if not all(_number(x) for x in (decay, eps, momentum, weight_decay)):
        return None
    decay, eps, momentum, wd = float(decay), float(eps), float(momentum), float(weight_decay)

    def fused(grads, opt_state, params, donated):
        if not (isinstance(params, dict) and isinstance(grads, dict) and params
                and params.keys() == grads.keys()
                and _of_chain(opt_state, {rms_at: ScaleByRmsState, trace_at: TraceState},
                              rate_at)):
            return None
        rms, rate = opt_state[rms_at], opt_state[rate_at]
        trace = opt_state[trace_at].trace if trace_at is not None else None
        trees = [rms.nu] + ([rms.mu] if centered else []) + ([trace] if trace_at is not None
                                                             else [])
        if not all(isinstance(t, dict) and t.keys() == params.keys() for t in trees):
            return None
        groups = _groups(params, (grads, *trees))
        if groups is None:
            return None
        lr = _rate(learning_rate, rate)
        new_p, new = {}, [{} for _ in trees]
        for _, names, p, g, v, *rest in groups:
            mu = rest.pop(0) if centered else None
            t = rest.pop(0) if trace_at is not None else None
            p, v, mu, t = foreach.rmsprop(p, g, v, mu, t, decay=decay, eps=eps,
                                          weight_decay=wd, momentum=momentum,
                                          lr=_lr_for(lr, p[0]), into=donated)
            new_p.update(zip(names, p))
            for into, tree in zip(new, [x for x in (v, mu, t) if x is not None]):
                into.update(zip(names, tree))
        # each tree in its own order (a donated state is written into by position)
        new = [{k: n[k] for k in tree} for n, tree in zip(new, trees)]
        replaced = {rms_at: rms._replace(nu=new[0], mu=new[1] if centered else rms.mu)}
        if trace_at is not None:
            replaced[trace_at] = opt_state[trace_at]._replace(trace=new[-1])
        return {k: new_p[k] for k in params}, _stepped(opt_state, replaced, rate_at, lr, donated)

    return fused


def fused_lion(learning_rate: Any, b1: Any, b2: Any, weight_decay: Any,
               decays: Callable[[Mapping], dict[str, bool]], *, lion_at: int,
               rate_at: int) -> Fused | None:
    """The fused eager update of a Lion chain (``fx.optim.lion``) whose ``scale_by_lion`` state
    sits at ``lion_at`` and ``scale_by_learning_rate``'s at ``rate_at``
    (``fxtrain._torch.foreach.lion``), the decay on the leaves ``decays`` selects. None where a
    hyperparameter other than the learning rate is a tensor."""
    if not all(_number(x) for x in (b1, b2, weight_decay)):
        return None
    b1, b2, wd = float(b1), float(b2), float(weight_decay)

    def fused(grads, opt_state, params, donated):
        if not (isinstance(params, dict) and isinstance(grads, dict) and params
                and _of_chain(opt_state, {lion_at: ScaleByLionState}, rate_at)):
            return None
        state, rate = opt_state[lion_at], opt_state[rate_at]
        if not (isinstance(state.mu, dict) and state.mu.keys() == params.keys() == grads.keys()):
            return None
        decay_of = decays(params) if wd else {}
        groups = _groups(params, (grads, state.mu), lambda k: decay_of.get(k, False))
        if groups is None:
            return None
        lr = _rate(learning_rate, rate)
        new_p, new_m = {}, {}
        for decay, names, p, g, m in groups:
            p, m = foreach.lion(p, g, m, b1=b1, b2=b2, weight_decay=wd if decay else 0.0,
                                lr=_lr_for(lr, p[0]), into=donated)
            new_p.update(zip(names, p))
            new_m.update(zip(names, m))
        # the moments in their own order (a donated state is written into by position)
        replaced = {lion_at: state._replace(mu={k: new_m[k] for k in state.mu})}
        return {k: new_p[k] for k in params}, _stepped(opt_state, replaced, rate_at, lr, donated)

    return fused
