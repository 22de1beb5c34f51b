"""test_logging_interop's tests that run processes (the rest: tests/unit/test_logging_interop.py)."""

import json
import struct
import subprocess
import sys
import textwrap
import time
import numpy as np
import pytest
import torch
from helpers import extra
import fxtrain as fx
from helpers_logging import CLU_SCRIPT


@pytest.mark.slow
def test_clu_writers_wrap_fxtrain_writers_inside_fit(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import clu.metric_writers"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("clu.metric_writers does not import here (it needs TensorFlow: install "
                    f"fxtrain[clu]): {probe.stderr.strip().splitlines()[-1:]}")
    out = subprocess.run([sys.executable, "-c", CLU_SCRIPT, str(tmp_path / "m.jsonl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "clu ok" in out.stdout, out.stderr[-3000:]
    events = list(fx.logging.read_jsonl(tmp_path / "m.jsonl"))
    kinds = [(e["step"], e["kind"]) for e in events]
    assert kinds == [(None, "hparams"), (0, "texts"), (5, "scalars"), (10, "scalars"),
                     (10, "scalars"), (10, "histograms")]  # metrics, then model_watch's
    assert set(events[2]["values"]) >= {"train/loss", "train/grad_norm"}
    assert set(events[4]["values"]) == {"parameters/norm/weight", "parameters/norm/bias"}
    assert events[5]["values"]["parameters/weight"]["shape"] == [8]  # samples for clu's bins
    assert "train/loss" in out.stderr  # clu's LoggingWriter, through absl logging
