"""test_workdir's tests that run several ranks (the rest: tests/unit/test_workdir.py)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
import pytest
from fxtrain.apps._workdir import LOCK_NAME, WorkdirLocked, _take_over, acquire, held, release
from helpers_apps import _ranks


def test_under_torch_distributed_rank_0_takes_the_lock_and_every_rank_refuses(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks, args=(port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["owner"] == one["owner"] == zero["me"] != one["me"]
    assert zero["released"] and one["released"]
    assert zero["refused"].startswith(f"WorkdirLocked: the workdir {tmp_path / 'busy'} is in use")
    assert one["refused"].startswith("RuntimeError: rank 0 could not lock the workdir")
    assert f"pid {os.getpid()} on host" in one["refused"]
