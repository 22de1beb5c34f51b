"""Torch's portable compile caches, for ``fx.precompiled`` where torch's AOT precompile serves
no step (``fxtrain._torch.aot``: torch before 2.13, or a step torch's precompile cannot save).

Checked on torch 2.11.0, 2.13.0 and 2.15.0. Public API: ``torch.compiler.save_cache_artifacts``
returns the artifacts of every compile this process made so far (Inductor's compiled graphs
and, on the CPU, its C++ kernels; AOTAutograd's graphs; Dynamo's profiles) as bytes, and
``torch.compiler.load_cache_artifacts`` puts them into this process's caches, so that the next
``torch.compile`` of the same code finds them instead of compiling (Dynamo still traces the
step: a second or two of a warm start). Where the caches are off (``fx_graph_cache=False``)
``save`` gives None: nothing to keep.
"""

from __future__ import annotations

import torch


def save() -> bytes | None:
    """This process's compile artifacts so far, or None where there are none."""
    out = torch.compiler.save_cache_artifacts()
    if out is None:
        return None
    data, info = out
    return None if not data or info.empty() else data


def load(body: bytes) -> None:
    """Puts the artifacts ``save`` gave into this process's caches (raises where torch cannot
    read them)."""
    torch.compiler.load_cache_artifacts(body)
