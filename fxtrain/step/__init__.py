"""The train and eval steps: ``make_train_step`` and ``make_eval_step`` (``_steps.py``), one
update in named phases (``_phases.py``), their arguments checked (``_args.py``), the batches
and losses they take (``_io.py``), how gradients are taken (``_autodiff.py``), K steps a call
(``_k_steps.py``), a step's spec (``_spec.py``), how ``fit`` calls it (``_call.py``), and what
runs a step: CUDA graphs (``_graphs.py``), a compiled step kept in a file (``_precompile.py``,
``_precompiled_file.py``), a call without Dynamo's guards (``_unguarded.py``), ``fx.remat``
(``_remat.py``) and ``fx.regional``, blocks compiled once for every layer (``_regions.py``).
The public names are ``fxtrain``'s (``fx.make_train_step``, ...).
"""

from ._compile import compile
from ._graphs import cuda_graphed
from ._phases import revert_update
from ._precompile import precompiled
from ._regions import regional
from ._remat import remat
from ._spec import StepSpec, step_spec
from ._steps import LossFn, make_eval_step, make_train_step

__all__ = ["make_train_step", "make_eval_step", "revert_update", "StepSpec", "step_spec",
           "cuda_graphed", "precompiled", "regional", "remat", "LossFn", "compile"]
