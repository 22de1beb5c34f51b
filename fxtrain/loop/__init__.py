"""The training loop and what runs steps over data: ``fit`` (``_fit.py``), the run's plan and
progress (``_run.py``), resuming from a checkpoint manager (``_resuming.py``), control flags
waiting for one read (``_flags.py``), SIGTERM during a run (``_preemption.py``), ``evaluate``
(``_evaluation.py``), ``predict`` (``_predict.py``), ``lr_find`` (``_lr_find.py``) and
``find_batch_size`` (``_batch_size.py``). The public names are ``fxtrain``'s (``fx.fit``, ...).
"""

from ._batch_size import BatchSizeFind, find_batch_size
from ._evaluation import evaluate
from ._fit import Interrupted, fit
from ._lr_find import LrFind, lr_find
from ._predict import predict
from ._preemption import Preempted

__all__ = ["fit", "Interrupted", "Preempted", "evaluate", "predict", "lr_find", "LrFind",
           "find_batch_size", "BatchSizeFind"]
