import os
import sys
import types

import pytest
import torch
import torch._dynamo

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# tensorboard's reader imports TensorFlow when it is installed (the clu extra installs it);
# this module is tensorboard's own switch for its TensorFlow-free build. TensorFlow runs only
# in the clu test, in a subprocess.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
