"""A missing optional extra is a clear error that names the extra to install. These run
without the extras (the import is blocked), so they never skip."""

import sys

import pytest

import fxtrain as fx
from fxtrain.callbacks.hf import hf_callback


@pytest.mark.parametrize("module,call,extra", [
    ("transformers", lambda: hf_callback(object()), "hf"),
    ("torchmetrics", lambda: fx.metrics.from_torchmetrics(object()), "metrics"),
    ("wandb", lambda: fx.logging.WandbWriter("p", mode="offline"), "wandb"),
    ("mlflow.tracking", lambda: fx.logging.MlflowWriter("mlruns"), "mlflow"),
    ("comet_ml", lambda: fx.logging.CometWriter("p", online=False), "comet"),
    ("neptune", lambda: fx.logging.NeptuneWriter("w/p", mode="offline"), "neptune"),
], ids=["hf", "metrics", "wandb", "mlflow", "comet", "neptune"])
def test_a_missing_extra_names_it(monkeypatch, module, call, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install '?fxtrain\[{extra}\]"):
        call()
