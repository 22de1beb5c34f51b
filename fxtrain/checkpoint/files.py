"""Checkpoint files on disk: flushing them and their directories (what makes a rename into place
durable) and their CRC-32s, ``fxtrain._files``'s, under the name the checkpoint modules and
benchmarks use."""

from .._files import file_crc, fsync_path

__all__ = ["file_crc", "fsync_path"]
