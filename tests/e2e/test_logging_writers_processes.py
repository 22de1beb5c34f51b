"""test_logging_writers's tests that run processes (the rest: tests/unit/test_logging_writers.py)."""

import json
import logging
import math
import signal
import subprocess
import sys
import numpy as np
import pytest
import torch
from helpers import extra, reaped
import fxtrain as fx
from helpers_logging import KILLED


@pytest.mark.slow
def test_jsonl_survives_sigkill(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(KILLED)
    with reaped(subprocess.Popen([sys.executable, str(script), str(tmp_path / "m.jsonl")],
                                 stdout=subprocess.PIPE, text=True)) as proc:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    events = list(fx.logging.read_jsonl(tmp_path / "m.jsonl"))
    assert len(events) > 200
    assert [e["step"] for e in events] == list(range(len(events)))
