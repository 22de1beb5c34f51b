"""The training loop and what runs steps over data: ``fit`` (``_fit.py``), the run's plan and
progress (``_run.py``), resuming from a checkpoint manager (``_resuming.py``), control flags
waiting for one read (``_flags.py``), SIGTERM during a run (``_preemption.py``), ``evaluate``
(``_evaluation.py``), ``predict`` (``_predict.py``) and ``lr_find`` (``_lr_find.py``). The public
names are ``fxtrain``'s (``fx.fit``, ...).
"""

from ._evaluation import evaluate
from ._fit import Interrupted, fit
from ._lr_find import LrFind, lr_find
from ._predict import predict
from ._preemption import Preempted

__all__ = ["fit", "Interrupted", "Preempted", "evaluate", "predict", "lr_find", "LrFind"]
