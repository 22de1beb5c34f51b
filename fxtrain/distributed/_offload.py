"""The optimizer state in host memory (``fx.shard(state, offload="optimizer")``), as FSDP2's
``CPUOffloadPolicy`` and DeepSpeed's ZeRO-Offload keep it.

A sharded state's optimizer leaves (the AdamW moments, the counts) live on the host; its
parameters stay on their device, where the forward and backward run. A step's update
(``fxtrain.step._updates.offloaded``) copies the reduced gradient shards and the parameter
shards to the host, runs the optimizer's update there (``apply_gradients``: eagerly,
``torch.optim``'s foreach ops on the local shards), and copies the new parameter shards back.
The copy to the host waits for the backward, so an offloaded step syncs the host once, as an
update that runs on the CPU must. The arithmetic is the one without offload, op for op, so a
run gives the same bits with and without it (on a CPU-only machine, host and device are one
memory and nothing moves: ``tests/ranks/test_offload_ranks.py``).

A DTensor keeps its mesh and placements and only its local tensor moves, as FSDP2's offloaded
parameters do: checkpoints save the same shards with the same metadata, so a checkpoint of an
offloaded run restores without it, and the reverse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from ._dtensors import is_dtensor

HOST = torch.device("cpu")

OFFLOADS = ("optimizer",)
"""What ``fx.shard(offload=...)`` can keep on the host."""


def checked(offload: str | None) -> str | None:
    """``offload`` if ``fx.shard`` can lay it out, else a ValueError naming the choices."""
    if offload is not None and offload not in OFFLOADS:
        raise ValueError(f"fx.shard: offload={offload!r}; it takes one of {list(OFFLOADS)} "
                         "(the optimizer state on the host) or None")
    return offload


def _moved(local: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """``local`` on ``device`` (``local`` itself where it is there already); onto the host
    from an accelerator through pinned memory (a page-locked buffer the copy goes to
    directly, as FSDP2's offload keeps its shards) where ``pinned``: an eager step's copies
    (a compiled step's are the graph's, which Inductor makes). A meta tensor (a skeleton's, as
    ``fx.from_pretrained`` shards it) has no data to move and stays."""
    if local.is_meta:
        return local
    if pinned and device == HOST and local.device.type != "cpu":
        out = torch.empty(local.shape, dtype=local.dtype, device=HOST, pin_memory=True)
        return out.copy_(local)
    return local.to(device)


def moved(t: Any, device: torch.device, pinned: bool = True) -> Any:
    """``t`` with its data on ``device``: a DTensor's local tensor moved (its mesh, placements
    and global shape kept), a plain tensor moved, anything else as it is; ``t`` itself where
    its data is there already (on a CPU-only machine, always)."""
    if is_dtensor(t):
        from torch.distributed.tensor import DTensor
        local = t.to_local()
        there = _moved(local, device, pinned)
        if there is local:
            return t
        return DTensor.from_local(there, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    if isinstance(t, torch.Tensor):
        return _moved(t, device, pinned)
    return t


def to_host(tree: Any, pinned: bool = True) -> Any:
    """``tree``'s tensors copied to the host (``moved``; ``pinned``: into pinned memory from
    an accelerator)."""
    return pytree.tree_map(lambda t: moved(t, HOST, pinned), tree)


def to_devices(tree: Any, like: Any) -> Any:
    """``tree``'s tensors copied back to the devices of ``like``'s tensors in their place."""
    return pytree.tree_map(lambda t, d: moved(t, local_device(d), False), tree, like)


def local_device(t: torch.Tensor) -> torch.device:
    """Where ``t``'s data lives: a DTensor's local tensor's device (its mesh's device type
    need not be it, once offloaded)."""
    return t.to_local().device if is_dtensor(t) else t.device
