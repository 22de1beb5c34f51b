"""test_precompile's tests that run processes (the rest: tests/unit/test_precompile.py)."""

import errno
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
import pytest
import torch
import torch.nn.functional as F
from torch import nn
import fxtrain as fx
import fxtrain.step._precompile as precompile
from fxtrain.step import _precompiled_file as stored
from fxtrain._torch import aot
from fxtrain.step._precompile import compile_options
from test_precompile import (DAMAGED, SAVES, child, in_a_kernel, REPLACED)


@pytest.mark.slow
def test_a_second_process_loads_the_step_and_trains_bitwise_as_the_compiled_step(tmp_path):
    path = tmp_path / "step.bin"
    first, second, reference = (child(tmp_path, path, mode)[0]
                                for mode in ("save", "load", "reference"))
    assert (first["loaded"], second["loaded"]) == (False, True)
    # the same kernels on the same machine: the same bits as torch.compile of the step
    assert first["digest"] == second["digest"] == reference["digest"]


@pytest.mark.slow
@SAVES
def test_a_bit_flipped_in_a_kernel_is_named_where_a_cold_inductor_cache_would_compile_it(
        tmp_path):
    """Before issue 46 a process whose Inductor cache was cold compiled the flipped source of
    the saved kernel and trained with it (another loss, no warning); now the file is named, the
    step compiled again, and it trains the clean run's bits."""
    path = tmp_path / "step.bin"
    clean = child(tmp_path, path, "save")[0]
    path.write_bytes(in_a_kernel(path.read_bytes()))
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold-inductor-cache")}
    flipped, stderr = child(tmp_path, path, "load", cold)
    assert f"fx.precompiled: {path} {DAMAGED}; {REPLACED}" in stderr
    assert flipped["loaded"] is False and flipped["digest"] == clean["digest"]
