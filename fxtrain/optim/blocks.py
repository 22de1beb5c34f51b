"""Transforms that treat each parameter tensor as one block: they scale a whole tensor's update
by a root mean square (of the update, or of the parameter), as Adafactor does."""

from __future__ import annotations

import torch

from ..tree import tree_map
from .base import GradientTransformation
from .transforms import _non_negative, _scalar


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(x * x))


def clip_by_block_rms(threshold: float | torch.Tensor) -> GradientTransformation:
    """Clips each parameter's update to a root mean square of at most ``threshold``.

    u -> u / max(1, rms(u) / threshold), per tensor (a "block": a weight vector or matrix).

    Args:
      threshold: the largest root mean square an update keeps; > 0.

    Returns:
      A stateless ``GradientTransformation`` (its state is None).

    Examples:
        >>> tx = fx.optim.clip_by_block_rms(1.0)
        >>> grads = {"w": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.5])}
        >>> tx.update(grads, tx.init(None))[0]  # rms([3, -4]) = 3.54; rms([0.5]) < 1 stays
        {'w': tensor([ 0.8485, -1.1314]), 'b': tensor([0.5000])}
    """
    if isinstance(threshold, (int, float)) and not threshold > 0:
        raise ValueError(f"clip_by_block_rms: threshold must be > 0, got {threshold}")

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        del params
        return tree_map(lambda u: u / torch.clamp(_rms(u) / _scalar(threshold, u), min=1.0),
                        updates), state

    return GradientTransformation(init, update)


def scale_by_param_block_rms(min_scale: float | torch.Tensor = 1e-3) -> GradientTransformation:
    """Scales each parameter's update by that parameter's root mean square (at least ``min_scale``).

    u -> u * max(rms(p), min_scale), per tensor: Adafactor's relative step size.

    Args:
      min_scale: the smallest factor, so that parameters at 0 still move; >= 0.

    Returns:
      A stateless ``GradientTransformation``; its ``update`` needs the params.

    Examples:
        >>> tx = fx.optim.scale_by_param_block_rms()
        >>> params = {"w": torch.tensor([3.0, -4.0]), "z": torch.zeros(2)}
        >>> grads = {"w": torch.ones(2), "z": torch.ones(2)}
        >>> tx.update(grads, tx.init(params), params)[0]
        {'w': tensor([3.5355, 3.5355]), 'z': tensor([0.0010, 0.0010])}
    """
    _non_negative("scale_by_param_block_rms", min_scale=min_scale)

    def init(params):
        del params
        return None

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs params; call "
                             "update(grads, state, params)")
        return tree_map(lambda u, p: u * torch.clamp(_rms(p), min=_scalar(min_scale, p)).to(
            u.dtype), updates, params), state

    return GradientTransformation(init, update)
