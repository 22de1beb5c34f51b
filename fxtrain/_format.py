"""Numbers as text, for lines people read (no torch: the command line imports it at start)."""

from __future__ import annotations

from collections.abc import Mapping


def format_scalars(scalars: Mapping[str, float], sep: str = " ") -> str:
    """``name=value`` pairs with 4 significant digits.

    Examples:
        >>> from fxtrain._format import format_scalars
        >>> format_scalars({"loss": 0.123456, "lr": 0.001})
        'loss=0.1235 lr=0.001'
    """
    return sep.join(f"{k}={v:.4g}" for k, v in scalars.items())
