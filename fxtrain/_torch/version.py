"""The torch fxtrain runs on: its release as numbers, the range fxtrain supports, and refusals
for a feature this torch lacks.

Public API only (``torch.__version__``).
"""

from __future__ import annotations

import re

import torch

from .traced_errors import fail, raisable

def release(version: str = torch.__version__) -> tuple[int, int, int]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``; a pre-release (``2.16.0a0+git...``) as its release."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


TORCH = release()
"""This process's torch, as ``(major, minor, patch)``."""


def at_least(major: int, minor: int) -> bool:
    """Whether this torch is ``major.minor`` or later."""
    return TORCH[:2] >= (major, minor)


@raisable  # fail() raises it out of a trace as itself
class UnsupportedTorchError(RuntimeError):
    """A feature this torch release lacks; the message names the feature and the first torch
    that has it."""


def refusal(feature: str, major: int, minor: int, instead: str = "") -> str:
    """The message of ``UnsupportedTorchError``: ``feature``, the first torch that has it, this
    process's, and ``instead`` (what to do on this torch, a sentence)."""
    return (f"{feature} needs torch {major}.{minor} or later; this process has torch "
            f"{torch.__version__}" + (f". {instead}" if instead else ""))


def require(feature: str, major: int, minor: int, instead: str = "") -> None:
    """Raises ``UnsupportedTorchError`` (``refusal``'s message) when this torch is older than
    ``major.minor``, eagerly or while Dynamo traces."""
    if not at_least(major, minor):
        fail(UnsupportedTorchError, refusal(feature, major, minor, instead))
