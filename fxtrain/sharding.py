"""``fx.sharding``: a sharded ``TrainState`` (FSDP, tensor parallel, FSDP x TP, HSDP) on
``torch.distributed.tensor``; the face of ``fxtrain.distributed``'s sharding.

``fx.shard(state)`` returns the state with its parameters and their optimizer state split over
the ranks, and another ``Layout`` (``state.layout``). What each layout does, and how a step
trains it, is told in ``docs/distributed.md`` and in ``fx.shard``'s own docstring.
"""

from .distributed import (gathered, is_dtensor, is_sharded, local_nbytes, mesh, shard,
                          unit_names, with_whole_params)

__all__ = ["shard", "mesh", "is_dtensor", "is_sharded", "gathered", "with_whole_params",
           "local_nbytes", "unit_names"]
