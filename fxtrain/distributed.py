"""Where this process stands in a torch.distributed job (rank 0 of 1 when there is none)."""

from __future__ import annotations

import torch

__all__ = ["rank", "world_size"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank, 0 without an initialized process group."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """The number of processes, 1 without an initialized process group."""
    return torch.distributed.get_world_size() if _initialized() else 1
