"""Functional checkpoints on orbax-checkpoint: the whole state saved as one value, restored into
a template (``restore(like=state)``) as a new value.

orbax (and jax) are imported on the first save or restore, never by ``import fxtrain``.
"""

from .bridge import CheckpointMismatchError as CheckpointMismatchError
from .manager import CheckpointManager as CheckpointManager
from .store import DamagedCheckpointError as DamagedCheckpointError
from .manager import restore as restore
from .manager import save as save

__all__ = ["CheckpointManager", "save", "restore", "CheckpointMismatchError"]
