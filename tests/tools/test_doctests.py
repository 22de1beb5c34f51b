"""Every ``>>>`` example in fxtrain's docstrings runs as a test, and no docstring keeps an
unrun ``Example::`` block.

Each example runs with ``fx``, ``torch`` and ``nn`` in its globals (besides its module's own
names), torch seeded with 0, in an empty working directory that must stay empty: an example
that writes files makes a temporary directory itself and removes it.
"""

import doctest
import importlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxtrain
from helpers import extra

PACKAGE = Path(fxtrain.__file__).resolve().parent
SKIPPED = {"fxtrain.__main__"}  # runs the command line on import
SKIPPED_PACKAGES = ("fxtrain.apps.demo",)  # the demo job: tested by test_demo.py
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# examples that import an optional extra: skipped without it (failed under
# FXTRAIN_REQUIRE_EXTRAS=1, as every test that needs an extra)
NEEDS = {
    "fxtrain.metrics._torchmetrics.from_torchmetrics": "torchmetrics",
    "fxtrain.logging.wandb.WandbWriter": "wandb",
    "fxtrain.logging.comet.CometWriter": "comet_ml",
    "fxtrain.logging.neptune.NeptuneWriter": "neptune",
    "fxtrain.callbacks.hf.hf_callback": "transformers",
    "fxtrain.apps._pretrained.export_pretrained": "transformers",
    "fxtrain.apps._from_pretrained.from_pretrained": "transformers",
    "fxtrain.precision.float8": "torchao",
}


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("fxtrain", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in SKIPPED and not name.startswith(SKIPPED_PACKAGES):
            names.append(name)
    return names


def _import(name: str):
    """The module, or None when an optional extra it needs is missing (allowed only without
    FXTRAIN_REQUIRE_EXTRAS=1)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("FXTRAIN_REQUIRE_EXTRAS") == "1":
            raise
        return None


def _cases() -> list:
    finder = doctest.DocTestFinder(exclude_empty=True)
    cases = []
    for name in _module_names():
        module = _import(name)
        if module is None:
            cases.append(pytest.param(None, id=name, marks=pytest.mark.skip(
                reason=f"{name} needs an optional extra that is not installed")))
            continue
        globs = {"fx": fxtrain, "torch": torch, "nn": nn}
        for test in finder.find(module, name, extraglobs=globs):
            if test.examples:
                cases.append(pytest.param(test, id=test.name))
    return cases


CASES = _cases()


@pytest.mark.parametrize("test", CASES)
def test_docstring_examples(test, tmp_path, monkeypatch):
    if test.name in NEEDS:
        extra(NEEDS[test.name])
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        result = runner.run(test, out=report.append, clear_globs=True)
    finally:
        torch.set_grad_enabled(True)
    assert result.failed == 0, "".join(report)
    assert not list(tmp_path.iterdir()), f"{test.name} left files in the working directory"


def test_there_are_doctests_for_the_main_names():
    names = {case.id for case in CASES}
    for name in ("fxtrain.state.TrainState.create", "fxtrain.loop._fit.fit",
                 "fxtrain.data._batches.Batches", "fxtrain.optim.aliases.adamw",
                 "fxtrain.checkpoint.manager.CheckpointManager"):
        assert name in names, f"no doctest for {name}"


def test_no_docstring_keeps_an_example_literal_block():
    holding = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "Example::" in p.read_text(encoding="utf-8"))
    assert not holding, ("write these examples as '>>>' doctests under 'Examples:' (Google "
                         f"style; mkdocstrings renders that section as code): {holding}")
