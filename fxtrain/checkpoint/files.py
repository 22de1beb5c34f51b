"""Flushing checkpoint files and directories to disk (what makes a rename into place durable):
``fxtrain._files``'s, under the name the checkpoint modules and benchmarks use."""

from .._files import fsync_path

__all__ = ["fsync_path"]
