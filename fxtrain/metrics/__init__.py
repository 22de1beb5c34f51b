"""``fx.metrics``: metric values in the style of clu's ``metrics``, frozen pytrees that merge
(``_builtin.py``: ``Average``, ``Std``, ``LastValue``, ``Accuracy``, ``ConfusionMatrix``,
``Collection``; ``_metric.py``: the ``Metric`` interface; ``_torchmetrics.py``:
``from_torchmetrics``), and the loop's step metrics averaged on the device (``_means.py``).
"""

from ._builtin import Accuracy, Average, Collection, ConfusionMatrix, LastValue, Std
from ._metric import Metric
# metric values pickled before the Metric interface had its own module name these here
from ._metric import _from_output_class as _from_output_class, _remake as _remake
from ._torchmetrics import from_torchmetrics

__all__ = ["Metric", "Average", "Std", "LastValue", "Accuracy", "ConfusionMatrix", "Collection",
           "from_torchmetrics"]
