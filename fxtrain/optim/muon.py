"""Muon (Jordan, 2024): momentum orthogonalised by Newton-Schulz iterations, for matrices, with
optax.contrib's names and arguments; the other parameters take AdamW, as optax does it.

Orthogonalising replaces the momentum M = U S V^T by about U V^T: every direction of the matrix
moves by the same amount. Five steps of the quintic X <- a X + (b A + c A^2) X, A = X X^T, from
X = M / ||M||, do it without a decomposition (the coefficients push the singular values towards
1 fast, landing in about [0.7, 1.2]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..tree import tree_map
from .aliases import nadamw
from .base import GradientTransformation, ScalarOrSchedule, chain
from .groups import multi_transform
from .transforms import (Mask, _betas, _check_state, _count, _ema, _mu_hat, _non_negative,
                         add_decayed_weights, scale_by_learning_rate)

_DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_NS_COEFFS_PRESETS = {
    "standard": _DEFAULT_NS_COEFFS,
    "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
}
_PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")


class MuonDimensionNumbers(NamedTuple):
    """Which axes of a weight are its input (reduction) and output axes; the rest are batch axes,
    each slice orthogonalised alone. optax's default (0, 1) is JAX's (in, out) layout; torch's
    ``nn.Linear.weight`` is (out, in), so ``muon`` uses ``MuonDimensionNumbers(1, 0)``."""

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


_TORCH_LAYOUT = MuonDimensionNumbers(reduction_axis=1, output_axis=0)
DimNums = MuonDimensionNumbers | Mapping[str, MuonDimensionNumbers | None] | Callable[
    [str, torch.Tensor], MuonDimensionNumbers | None]


def _axes(x: torch.Tensor, dim_nums: MuonDimensionNumbers) -> tuple[tuple[int, ...], ...]:
    def norm(axes):
        return tuple([a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes)])

    reduction, output = norm(dim_nums.reduction_axis), norm(dim_nums.output_axis)
    if set(reduction) & set(output):
        raise ValueError(f"muon: reduction axes {reduction} and output axes {output} overlap "
                         f"for a parameter of shape {tuple(x.shape)}")
    batch = tuple([a for a in range(x.ndim) if a not in reduction + output])
    return batch, reduction, output


def _fans(x: torch.Tensor, dim_nums: MuonDimensionNumbers) -> tuple[int, int]:
    _, reduction, output = _axes(x, dim_nums)
    return math.prod([x.shape[a] for a in reduction]), math.prod([x.shape[a] for a in output])


def _ns_step(x, coeffs, first, preconditioning, eps):
    a = x @ x.transpose(-1, -2)
    if first and preconditioning == "aol":  # Boissin et al., 2025
        s = torch.rsqrt(torch.clamp(a.abs().sum(-1), min=eps)).unsqueeze(-1)
        x, a = x * s, a * s * s.transpose(-1, -2)
    elif first and preconditioning == "schatten":  # Grishina et al., 2025
        s = torch.rsqrt(torch.clamp(torch.linalg.matrix_norm(a), min=eps))[..., None, None]
        x, a = x * s, a * s * s
    b = coeffs[1] * a + coeffs[2] * a @ a
    return coeffs[0] * x + b @ x


def orthogonalize_via_newton_schulz(x: torch.Tensor, ns_coeffs: Sequence = _DEFAULT_NS_COEFFS,
                                    ns_steps: int = 5, preconditioning: str = "frobenius",
                                    eps: float = 1e-8,
                                    dimension_numbers: MuonDimensionNumbers | None = None
                                    ) -> torch.Tensor:
    """About U V^T for x = U S V^T, by Newton-Schulz iterations (per batch slice of x).

    Args:
      x: a matrix, or a tensor with ``dimension_numbers``.
      ns_coeffs: (a, b, c), or one triple per step (then ``ns_steps`` is ignored).
      ns_steps: the number of iterations.
      preconditioning: how x is scaled first: ``"frobenius"`` (x / (||x||_F + eps)),
        ``"spectral"`` (by the largest singular value), ``"aol"`` or ``"schatten"`` (a rescaled
        first iteration).
      eps: added to denominators.
      dimension_numbers: the reduction and output axes of x (default: a matrix, (0, 1)).

    Examples:
        >>> x = torch.tensor([[3.0, 0.0], [0.0, 0.1]])
        >>> fx.optim.orthogonalize_via_newton_schulz(x)  # singular values 3 and 0.1: both near 1
        tensor([[0.6970, 0.0000],
                [0.0000, 1.1288]])
    """
    if x.ndim != 2 and dimension_numbers is None:
        raise ValueError(f"orthogonalize_via_newton_schulz needs a matrix or dimension_numbers; "
                         f"got shape {tuple(x.shape)}")
    if preconditioning not in _PRECONDITIONINGS:
        raise ValueError(f"muon: preconditioning must be one of {_PRECONDITIONINGS}, got "
                         f"{preconditioning!r}")
    steps = [ns_coeffs] * ns_steps if not isinstance(ns_coeffs[0], Sequence) else list(ns_coeffs)
    dims = dimension_numbers or MuonDimensionNumbers()
    batch, reduction, output = _axes(x, dims)
    perm = batch + reduction + output
    shape = [x.shape[a] for a in perm]
    flat = x.permute(perm).reshape(math.prod(shape[:len(batch)]), *_fans(x, dims))
    wide = flat.shape[1] <= flat.shape[2]
    y = flat if wide else flat.transpose(-1, -2)
    if preconditioning == "frobenius":
        y = y / (torch.linalg.matrix_norm(y)[..., None, None] + eps)
    elif preconditioning == "spectral":
        y = y / (torch.linalg.matrix_norm(y, ord=2)[..., None, None] + eps)
    for i, coeffs in enumerate(steps):
        y = _ns_step(y, coeffs, i == 0, preconditioning, eps)
    y = y if wide else y.transpose(-1, -2)
    return y.reshape(shape).permute(sorted(range(x.ndim), key=lambda i: perm[i]))


def _resolve(spec: DimNums | None, name: str, p: torch.Tensor) -> MuonDimensionNumbers | None:
    """The dimension numbers of one parameter: None (not a Muon parameter) or a spec."""
    if spec is None:
        return _TORCH_LAYOUT if p.ndim == 2 else None
    if isinstance(spec, MuonDimensionNumbers):
        return spec
    return spec[name] if isinstance(spec, Mapping) else spec(name, p)


def _per_name(tree: Any, what: str) -> Mapping:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} needs the parameters as a flat dict of tensors, got "
                        f"{type(tree).__name__}")
    return tree


class MuonState(NamedTuple):
    """The state ``muon`` keeps between steps."""

    count: torch.Tensor
    mu: Any


def _check_coeffs(owner: str, ns_coeffs: Any, ns_steps: int) -> Any:
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in _NS_COEFFS_PRESETS:
            raise ValueError(f"{owner}: unknown ns_coeffs preset {ns_coeffs!r}; the presets are "
                             f"{sorted(_NS_COEFFS_PRESETS)}")
        ns_coeffs = _NS_COEFFS_PRESETS[ns_coeffs]
    rows = ns_coeffs if isinstance(ns_coeffs[0], Sequence) else (ns_coeffs,)
    if any(len(row) != 3 for row in rows):
        raise ValueError(f"{owner}: ns_coeffs must be (a, b, c) or a sequence of them, got "
                         f"{ns_coeffs}")
    if rows is ns_coeffs and len(rows) > ns_steps:
        raise ValueError(f"{owner}: {len(rows)} rows of ns_coeffs for ns_steps={ns_steps}")
    return ns_coeffs


def scale_by_muon(ns_coeffs: Sequence | str = _DEFAULT_NS_COEFFS, ns_steps: int = 5,
                  beta: float | torch.Tensor = 0.95, eps: float = 1e-8,
                  mu_dtype: torch.dtype | None = None, *, nesterov: bool = True,
                  adaptive: bool = False, preconditioning: str = "frobenius",
                  weight_dimension_numbers: DimNums | None = None) -> GradientTransformation:
    """Muon's direction: the (Nesterov) momentum, bias-corrected, then orthogonalised.

    m <- beta m + (1 - beta) g;  m_hat = m / (1 - beta^t), or with Nesterov
    beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t);  u = NS(m_hat)
    (times <m_hat, NS(m_hat)> with ``adaptive``). Every parameter must be a matrix, or have
    dimension numbers: ``weight_dimension_numbers`` is one ``MuonDimensionNumbers``, a dict by
    name, or ``fn(name, param)``. The Newton-Schulz coefficients are constants of the transform,
    not (as in optax's ``MuonState``) part of the state.

    Examples:
        >>> tx = fx.optim.scale_by_muon()
        >>> params = {"w": torch.zeros(2, 2)}
        >>> updates, state = tx.update({"w": torch.tensor([[2.0, 0.0], [0.0, 0.1]])},
        ...                            tx.init(params))
        >>> updates["w"]  # singular values 2 and 0.1 in, both near 1 out
        tensor([[0.6978, 0.0000],
                [0.0000, 0.7578]])
    """
    ns_coeffs = _check_coeffs("scale_by_muon", ns_coeffs, ns_steps)
    _betas("scale_by_muon", beta=beta)
    _non_negative("scale_by_muon", eps=eps)
    if preconditioning not in _PRECONDITIONINGS:
        raise ValueError(f"scale_by_muon: preconditioning must be one of {_PRECONDITIONINGS}, "
                         f"got {preconditioning!r}")

    def init(params):
        return MuonState(_count(params), tree_map(
            lambda p: torch.zeros_like(p, dtype=mu_dtype or p.dtype), params))

    def update(updates, state, params=None):
        del params
        _check_state(state.mu, updates, "scale_by_muon")
        count = state.count + 1
        mu = _ema(updates, state.mu, beta)

        def direction(name, m, g):
            spec = _resolve(weight_dimension_numbers, name, g)
            if spec is None:
                raise ValueError(f"scale_by_muon: parameter {name!r} of shape {tuple(g.shape)} "
                                 "is not a matrix and has no weight_dimension_numbers (muon() "
                                 "gives such parameters AdamW)")
            m_hat = _mu_hat(m, g, beta, count, nesterov)  # Adam's and NAdam's m_hat
            o = orthogonalize_via_newton_schulz(m_hat, ns_coeffs, ns_steps, preconditioning,
                                                eps, spec)
            return torch.sum(m_hat * o) * o if adaptive else o

        mus = _per_name(mu, "scale_by_muon")
        out = {name: direction(name, mus[name], g) for name, g in updates.items()}
        return out, MuonState(count, tree_map(lambda m, old: m.to(old.dtype), mu, state.mu))

    return GradientTransformation(init, update)


def _scale_by_shape(weight_dimension_numbers: DimNums | None,
                    consistent_rms: float | None) -> GradientTransformation:
    """u -> sqrt(max(1, fan_out / fan_in)) u, or sqrt(max(fan_in, fan_out)) consistent_rms u."""

    def factor(name, u):
        fan_in, fan_out = _fans(u, _resolve(weight_dimension_numbers, name, u) or
                                MuonDimensionNumbers())
        if consistent_rms is None:
            return math.sqrt(max(1.0, fan_out / fan_in))
        return math.sqrt(max(fan_in, fan_out)) * consistent_rms

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return {name: u * factor(name, u) for name, u in updates.items()}, state

    return GradientTransformation(init, update)


def muon(learning_rate: ScalarOrSchedule, ns_coeffs: Sequence | str = _DEFAULT_NS_COEFFS,
         ns_steps: int = 5, beta: float | torch.Tensor = 0.95, eps: float = 1e-8,
         weight_decay: float | torch.Tensor = 0.0, weight_decay_mask: Mask = None,
         mu_dtype: torch.dtype | None = None, *, nesterov: bool = True, adaptive: bool = False,
         preconditioning: str = "frobenius", adam_b1: float | torch.Tensor = 0.9,
         adam_b2: float | torch.Tensor = 0.999, adam_eps_root: float | torch.Tensor = 0.0,
         adam_weight_decay: float | torch.Tensor = 0.0,
         adam_learning_rate: ScalarOrSchedule | None = None,
         muon_weight_dimension_numbers: DimNums | None = None,
         consistent_rms: float | None = None) -> GradientTransformation:
    """Muon (Jordan, 2024) on the matrices, AdamW on the other parameters, as optax.contrib.muon.

    Matrices: p <- p - lr (s NS(m_hat) + weight_decay p), s = sqrt(max(1, fan_out / fan_in))
    (or sqrt(max(fan_in, fan_out)) consistent_rms). The others: AdamW with ``adam_*``, ``eps``
    and ``nesterov`` (optax's choice: Nesterov by default). ``muon_weight_dimension_numbers``
    picks the Muon parameters and their axes: a dict by name or ``fn(name, param)`` giving a
    ``MuonDimensionNumbers`` or None (AdamW).

    One default differs from optax's, for torch's layout: a matrix's input axis is 1 and its
    output axis 0 (``nn.Linear.weight`` is (out, in); JAX's kernels are (in, out)), so s is
    ``torch.optim.Muon``'s sqrt(max(1, rows / cols)). ``mu_dtype`` applies to Muon's momentum
    only. ``torch.optim.Muon`` equals this with ``nesterov=False`` up to its bfloat16
    orthogonalisation (its Nesterov momentum, g + beta B, is not bias-corrected).

    Examples:
        >>> params = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> tx = fx.optim.muon(0.1)
        >>> grads = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "bias": torch.ones(2)}
        >>> updates, state = tx.update(grads, tx.init(params), params)
        >>> updates["weight"]  # -lr NS(I): five Newton-Schulz steps take I to about 1.1 I
        tensor([[-0.1108, -0.0000],
                [-0.0000, -0.1108]])
        >>> updates["bias"]  # AdamW's first (Nesterov) step
        tensor([-0.1474, -0.1474])
    """
    ns_coeffs = _check_coeffs("muon", ns_coeffs, ns_steps)
    _non_negative("muon", learning_rate=learning_rate, weight_decay=weight_decay)
    dim_nums = muon_weight_dimension_numbers

    def label(name, p):
        return "adam" if _resolve(dim_nums, name, p) is None else "muon"

    transforms: dict[Hashable, GradientTransformation] = {
        "muon": chain(
            scale_by_muon(ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov,
                          adaptive=adaptive, preconditioning=preconditioning,
                          weight_dimension_numbers=dim_nums),
            _scale_by_shape(dim_nums, consistent_rms),
            add_decayed_weights(weight_decay, weight_decay_mask),
            scale_by_learning_rate(learning_rate)),
        "adam": nadamw(learning_rate if adam_learning_rate is None else adam_learning_rate,
                       adam_b1, adam_b2, eps, adam_eps_root, adam_weight_decay,
                       nesterov=nesterov),
    }

    def groups(params):  # only the labels some parameter has (optax allows empty groups)
        labels = {name: label(name, p) for name, p in _per_name(params, "muon").items()}
        return multi_transform({k: t for k, t in transforms.items() if k in labels.values()},
                               labels)

    def init(params):
        return groups(params).init(params)

    def update(updates, state, params=None):
        return groups(updates if params is None else params).update(updates, state, params)

    return GradientTransformation(init, update)
