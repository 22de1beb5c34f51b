"""test_layout's tests that run processes (the rest: tests/unit/test_layout.py)."""

import subprocess
import sys
import sys as _sys
import types
import torch
from torch import nn
import fxtrain as fx
from helpers_step import HOOK, digests


def test_states_made_in_either_order_train_as_each_alone():
    want = {**digests("tied"), **digests("untied")}
    for order in (("tied", "untied"), ("untied", "tied")):
        assert digests(*order) == want, order
    assert want["tied"] != want["untied"]  # the two differ: the check can fail


def test_a_step_turns_on_autograds_dynamo_settings_only_while_it_is_traced():
    """A step on autograd's path needs two Dynamo settings while Dynamo traces it: building it
    changes nothing (nor imports Dynamo), and a compiled call, which traces it into one graph,
    leaves them as they were (issue 76: they were on for the process once a step was built)."""
    out = subprocess.run([sys.executable, "-c", HOOK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "False", "False"]
