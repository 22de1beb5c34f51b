"""test_layout's tests that run processes (the rest: tests/unit/test_layout.py)."""

import subprocess
import sys
import sys as _sys
import types
import torch
from torch import nn
import fxtrain as fx
from test_layout import (HOOK, digests)


def test_states_made_in_either_order_train_as_each_alone():
    want = {**digests("tied"), **digests("untied")}
    for order in (("tied", "untied"), ("untied", "tied")):
        assert digests(*order) == want, order
    assert want["tied"] != want["untied"]  # the two differ: the check can fail


def test_a_step_of_any_layout_turns_on_autograds_dynamo_settings_when_built_not_traced():
    """A step with autodiff="auto" learns its path from the state's layout while it is traced;
    the Dynamo settings autograd's path needs are turned on when it is built (once Dynamo is
    imported, without importing it), never from inside the trace."""
    out = subprocess.run([sys.executable, "-c", HOOK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]
