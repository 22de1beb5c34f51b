"""Adam's, SGD's, RMSprop's and Lion's updates over lists of tensors, by ``torch._foreach_*``
ops (private to ATen: what ``torch.optim``'s ``foreach=True`` runs).

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0 (each has every overload used here: a
0-d tensor as the scalar of ``mul`` and ``div``, a list of them for ``add``), eager and under
fake tensors (``benchmarks/simulate.py``). No public route runs one op over a
list of tensors; without them the caller runs its per-leaf update (``fxtrain.optim.fused``).
"""

from __future__ import annotations

import torch


_NARROW = (torch.bfloat16, torch.float16)


def _each(op: str, tensors: list, *args, into: bool, **kwargs) -> list:
    """``torch._foreach_<op>`` of ``tensors``: written into them where ``into``."""
    if into:
        if op == "mul" and isinstance(args[0], float) and tensors and \
                tensors[0].dtype in _NARROW and tensors[0].device.type == "cpu":
            # the CPU's _foreach_mul_ rounds a Python scalar to bfloat16 or float16 before it
            # multiplies (torch 2.11 to 2.15), where mul_ and _foreach_mul multiply by it in
            # float32: 0.9 became 0.8984375, and a donated step left the bits of the pure one.
            # CUDA's keeps the scalar in float32 (its fast path; a float32 0-d tensor there
            # would leave it, and copy from the host each step)
            args = (torch.tensor(args[0], dtype=torch.float32),)
        getattr(torch, f"_foreach_{op}_")(tensors, *args, **kwargs)
        return tensors
    return list(getattr(torch, f"_foreach_{op}")(tensors, *args, **kwargs))


def adam(p: list, g: list, m: list, v: list, *, b1: float, b2: float, eps: float,
         decay: torch.Tensor | None, l2: float, bc2_sqrt: torch.Tensor, step_size: torch.Tensor,
         into: bool) -> tuple[list, list, list]:
    """One Adam step of lists of parameters ``p``, gradients ``g`` and moments ``m``, ``v``
    (one device and dtype), in ``torch.optim``'s order, its scalars 0-d tensors on the
    leaves' device (read by no host, as its ``capturable=True``), in as many passes over
    memory as its ``foreach=True`` default (8 with a decay):

    g <- g + l2 p (Adam's L2, where ``l2``);  p <- decay p (AdamW's, where ``decay``)
    m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2 (one ``addcmul``)
    p <- p + m / ((sqrt(v) + eps bc2_sqrt) / (bc2_sqrt step_size))

    which is ``p + step_size m / (sqrt(v) / bc2_sqrt + eps)``, the bias correction and the
    step size folded into two scalars. Returns the new ``(p, m, v)``: the given lists, written
    into, where ``into``; new ones otherwise (the given tensors untouched). A zero step size
    moves nothing: the denominator is then infinite (its numerator is at least ``eps
    bc2_sqrt`` > 0), never 0/0.
    """
    if l2:
        g = list(torch._foreach_add(g, p, alpha=l2))
    fresh = into  # whether p is a list this step may write into
    if decay is not None:
        p, fresh = _each("mul", p, decay, into=into), True
    m = _each("lerp", m, g, 1 - b1, into=into)
    v = _each("mul", v, b2, into=into)
    torch._foreach_addcmul_(v, g, g, 1 - b2)
    denom = torch._foreach_sqrt(v)
    # a list of the one 0-d tensor: the single-tensor overload reads it on the host under
    # fake tensors (torch 2.13's fake kernel calls item()); on CUDA this op leaves the fast path
    torch._foreach_add_(denom, [eps * bc2_sqrt] * len(denom))
    torch._foreach_div_(denom, bc2_sqrt * step_size)
    return _each("addcdiv", p, m, denom, into=fresh), m, v


def sgd(p: list, g: list, t: list | None, *, weight_decay: float, momentum: float,
        nesterov: bool, lr: float | torch.Tensor, into: bool) -> tuple[list, list | None]:
    """One SGD step of lists of parameters ``p``, gradients ``g`` and momentum traces ``t``
    (None without momentum; one device and dtype), in ``torch.optim.SGD(foreach=True)``'s
    operations (dampening 0), as many passes over memory:

    d <- g + wd p;  t <- momentum t + d;  u <- t (or d + momentum t with Nesterov)
    p <- p - lr u

    each ``a + x b`` one ``add`` with ``alpha=x`` (a fused multiply-add where the CPU's vector
    unit has one), and ``p - lr u`` so too where ``lr`` is a float. A scheduled ``lr``, a 0-d
    tensor of the leaves' dtype on their device, multiplies ``u`` first (read by no host, as
    torch's capturable update). Returns the new ``(p, t)``: the given lists written into where
    ``into``; new ones otherwise. The gradients are never written into."""
    d = list(torch._foreach_add(g, p, alpha=weight_decay)) if weight_decay else g
    u = d
    if t is not None:
        t = _each("mul", t, momentum, into=into)
        torch._foreach_add_(t, d)
        u = t
        if nesterov:  # into d where this update made it (the decay's), else a new list
            u = _each("add", d, t, alpha=momentum, into=d is not g)
    return _step(p, u, lr, into), t


def _step(p: list, u: list, lr: float | torch.Tensor, into: bool) -> list:
    """``p - lr u``: one ``add`` with ``alpha=-lr`` where ``lr`` is a float, else ``u`` times
    ``-lr`` first (a 0-d tensor of the leaves' dtype on their device, read by no host)."""
    if isinstance(lr, torch.Tensor):
        return _each("add", p, list(torch._foreach_mul(u, -lr)), into=into)
    return _each("add", p, u, alpha=-lr, into=into)


def rmsprop(p: list, g: list, v: list, mu: list | None, t: list | None, *, decay: float,
            eps: float, weight_decay: float, momentum: float, lr: float | torch.Tensor,
            into: bool) -> tuple[list, list, list | None, list | None]:
    """One RMSprop step of lists of parameters ``p``, gradients ``g``, mean squares ``v``,
    means ``mu`` (centered; else None) and momentum traces ``t`` (None without momentum), one
    device and dtype, in ``torch.optim.RMSprop(foreach=True)``'s operations:

    d <- g + wd p;  v <- decay v + (1 - decay) d^2 (one ``addcmul``);  mu <- lerp(mu, d, 1 - decay)
    a <- sqrt(v - mu^2) + eps;  t <- momentum t + d / a;  p <- p - lr t (or p - lr d / a)

    Returns the new ``(p, v, mu, t)``: the given lists written into where ``into``; new ones
    otherwise. The gradients are never written into."""
    d = list(torch._foreach_add(g, p, alpha=weight_decay)) if weight_decay else g
    v = _each("mul", v, decay, into=into)
    torch._foreach_addcmul_(v, d, d, 1 - decay)
    if mu is not None:
        mu = _each("lerp", mu, d, 1 - decay, into=into)
        a = list(torch._foreach_addcmul(v, mu, mu, value=-1))
        torch._foreach_sqrt_(a)
    else:
        a = list(torch._foreach_sqrt(v))
    torch._foreach_add_(a, eps)
    if t is not None:
        t = _each("mul", t, momentum, into=into)
        torch._foreach_addcdiv_(t, d, a)
        return _step(p, t, lr, into), v, mu, t
    if isinstance(lr, torch.Tensor):
        torch._foreach_div_(a, -lr)
        return _each("addcdiv", p, d, a, into=into), v, mu, t
    return _each("addcdiv", p, d, a, value=-lr, into=into), v, mu, t


def lion(p: list, g: list, m: list, *, b1: float, b2: float, weight_decay: float,
         lr: float | torch.Tensor, into: bool) -> tuple[list, list]:
    """One Lion step of lists of parameters ``p``, gradients ``g`` and moments ``m`` (one
    device and dtype), in the composable update's operations but for its sums:

    u <- sign(lerp(m, g, 1 - b1)) + wd p;  m <- lerp(m, g, 1 - b2);  p <- p - lr u

    each ``a + x b`` one ``add`` with ``alpha=x`` (a fused multiply-add where the CPU's vector
    unit has one). Returns the new ``(p, m)``: the given lists written into where ``into``."""
    u = list(torch._foreach_lerp(m, g, 1 - b1))
    torch._foreach_sign_(u)
    if weight_decay:
        torch._foreach_add_(u, p, alpha=weight_decay)
    m = _each("lerp", m, g, 1 - b2, into=into)
    return _step(p, u, lr, into), m
