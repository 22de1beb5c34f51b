"""Resuming from a checkpoint manager, for ``fx.fit``: the latest readable checkpoint beyond
the state, falling back over damaged ones (set aside, kept); and waiting for the last save.
"""

from __future__ import annotations

import warnings
from typing import Any

from .. import distributed
from ..checkpoint.store import DamagedCheckpointError


def resume(checkpoint: Any, state: Any, resume: bool) -> Any:
    """``state`` restored from the checkpoint's latest step, when there is one beyond it."""
    latest = checkpoint.latest_step()
    if latest is None or latest <= int(state.step):
        return state
    if not resume:
        raise ValueError(f"fit: {checkpoint.directory} holds checkpoints up to step {latest}, "
                         f"ahead of this state (step {int(state.step)}); resume=True continues "
                         "from them, or give a new directory")
    try:
        restored = checkpoint.restore(state, latest)
    except DamagedCheckpointError as e:
        restored, latest = _fall_back(checkpoint, state, latest, e)
    print(f"fxtrain: resuming from the checkpoint of step {latest} in {checkpoint.directory}",
          flush=True)
    return restored


def _fall_back(checkpoint: Any, state: Any, damaged: int,
               error: DamagedCheckpointError) -> tuple[Any, int]:
    """The newest readable checkpoint older than the ``damaged`` one, and its step; the damaged
    ones are set aside (renamed, kept) so the run can write their steps again."""
    bad = [damaged]
    older = [s for s in getattr(checkpoint, "all_steps", lambda: [])() if int(state.step) < s
             < damaged]
    for step in reversed(older):
        try:
            restored = checkpoint.restore(state, step)
        except DamagedCheckpointError:
            bad.append(step)
            continue
        kept = [str(checkpoint.set_aside(s)) for s in bad] if hasattr(
            checkpoint, "set_aside") else []
        if distributed.is_rank_zero():
            warnings.warn(f"fit: {str(error).split('. The other checkpoints')[0]}; resuming "
                          f"from step {step}, the newest readable checkpoint"
                          + (f" (the damaged ones are kept as {', '.join(kept)})" if kept else ""),
                          RuntimeWarning, stacklevel=4)
        return restored, step
    raise DamagedCheckpointError(f"fit cannot resume: {error}; no older checkpoint here is "
                                 "readable either (pass resume=False and a new directory to "
                                 "start over)") from error


def wait(checkpoint: Any) -> None:
    if checkpoint is not None:
        checkpoint.wait()  # the final save is on disk when fit returns
