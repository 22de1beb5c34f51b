"""Inductor's settings that fxtrain changes while Dynamo traces a step.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0 (each has ``reorder_for_locality`` and
``allow_buffer_reuse``; a torch without one would raise AttributeError here, naming it). ``torch._inductor.config`` is
private. The public route, ``torch.compile(fn, options={"reorder_for_locality": False})``, is
the user's to choose when they compile: the need is known only while Dynamo traces the step and
meets a ``remat`` region or a unit, after its options were fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .traced_errors import run_while_tracing

_TURNED_OFF = ("reorder_for_locality", "allow_buffer_reuse")  # by the functions below


@contextlib.contextmanager
def inductor_settings_kept() -> Iterator[None]:
    """Inside, the settings the functions below turn off are put back as they were when the
    block ends (``torch._inductor.config.patch`` of their values now): ``fx.compile`` runs each
    call of its compiled step so, a trace and Inductor's compile included."""
    import torch._inductor.config as inductor

    with inductor.patch({k: getattr(inductor, k) for k in _TURNED_OFF}):
        yield


@run_while_tracing
def keep_recomputation_in_the_backward() -> bool:
    """Turns off Inductor's ``reorder_for_locality`` pass for the compiles that follow (run for
    real while Dynamo traces a step that uses ``fx.remat``, or per-block sharding's units). The
    pass moves each node next to the producers of its inputs; in a step whose forward, backward
    and update are one graph it so hoists the recomputation back into the forward, and the
    activations live on as if nothing were checkpointed (``benchmarks/remat_memory.py``, batch
    4096: 79 bytes per parameter with the pass, 31 without, against 92 with no remat), as do
    the units' gathered parameters (an 8-block GPT-2 on 2 ranks, ``benchmarks/scale.py``'s
    sizes: a step added 237 MiB with the pass, 100 without). It is a process-wide setting of
    torch's."""
    import torch._inductor.config as inductor

    inductor.reorder_for_locality = False
    return True


@run_while_tracing
def keep_region_outputs() -> bool:
    """Turns off Inductor's ``allow_buffer_reuse`` for the compiles that follow (run for real
    while Dynamo traces a step with ``fx.regional``'s blocks). On torch 2.11 to 2.15 Inductor
    reuses the buffer of a region's output (an ``invoke_subgraph`` call's) while it is still
    read: a step whose update follows its regions' backward trained other values than the
    same step without regions (a plain-torch repro, 3 blocks and an SGD update in one graph:
    1.0 off in a later block's weights; ``aot_eager`` and ``allow_buffer_reuse=False`` exact).
    It is a process-wide setting of torch's; the step's buffers are then each its own."""
    import torch._inductor.config as inductor

    inductor.allow_buffer_reuse = False
    return True


def mode_options(mode: str) -> dict[str, Any]:
    """Inductor's options of ``torch.compile``'s ``mode`` (``torch._inductor.list_mode_options``),
    for a compile that adds options of its own: ``torch.compile`` takes a mode or options, not
    both."""
    import torch._inductor
    return dict(torch._inductor.list_mode_options(mode))
