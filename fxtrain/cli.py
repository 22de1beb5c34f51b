"""The ``fxtrain`` command line's entry point (``fxtrain``, ``python -m fxtrain``): the CLI of
``fxtrain.apps`` (``fxtrain/apps/_cli.py``)."""

from .apps._cli import main

__all__ = ["main"]
