"""The CUDA caching allocator's history, for ``fx.callbacks.memory_snapshot`` and the
out-of-memory report of ``fx.fit``: every allocation and free with its stack, written as a
snapshot that torch's memory viewer opens (https://pytorch.org/memory_viz).

Private API: ``torch.cuda.memory._record_memory_history`` and ``_dump_snapshot``, the names
torch's own guide ("Understanding CUDA Memory Usage") teaches; checked on torch 2.11.0 and
2.13.0 (their signatures: ``enabled``, ``context``, ``stacks``, ``max_entries``; a filename).
There is no public route: on a torch without them, ``available()`` is False and the callers
write the state's accounting only, saying why.
"""

from __future__ import annotations

from pathlib import Path

import torch


def available() -> bool:
    """Whether this torch can record the CUDA allocator's history and a GPU is in use."""
    memory = getattr(torch.cuda, "memory", None)
    return (torch.cuda.is_available() and hasattr(memory, "_record_memory_history")
            and hasattr(memory, "_dump_snapshot"))


def record(max_entries: int) -> None:
    """Starts recording the allocator's history: the last ``max_entries`` allocations and
    frees, with their Python and C++ stacks."""
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=max_entries)


def stop() -> None:
    """Stops recording (the history recorded stays until the next ``record``)."""
    torch.cuda.memory._record_memory_history(enabled=None)


def dump(path: Path) -> None:
    """Writes the allocator's state and the history recorded to ``path`` (a pickle); without
    a history, the state of its segments alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
