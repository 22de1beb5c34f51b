"""States, saved checkpoints and child scripts shared by the checkpoint tests of several kinds
(tests/unit/test_checkpoint*.py and their tests/e2e/ counterparts)."""

import torch

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager
from helpers import mlp


# -- test_checkpoint.py's helpers -----------------------------------------------------------------

def make_state(dropout=0.0, callbacks=(), tx=None):
    return fx.TrainState.create(mlp((8, 16, 4), dropout), tx or fx.optim.adamw(1e-2),
                                callbacks=callbacks)


FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {tests!r})
import fxtrain as fx
from helpers import mlp
state = fx.TrainState.create(mlp((64, 256, 64)), fx.optim.adamw(1e-2))
m = fx.checkpoint.CheckpointManager({dir!r}, keep_latest=1)
m.save(state.replace(step=torch.tensor(1))); m.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # as if the disk were full
try:
    m.save(state.replace(step=torch.tensor(2))); m.wait()
except OSError as e:
    print("raised:", e)
else:
    print("no error")
"""


# -- test_checkpoint_retention.py's helpers -------------------------------------------------------

NAN = float("nan")
# step 2 is the best and soon old; step 4 ties it (the first to reach a value stays the best),
# step 5's is not a number and step 6 has none
LOSSES = [0.3, 0.1, 0.5, 0.1, NAN, None, 0.4]
SURVIVORS = [[1], [2], [2, 3], [2, 4], [2, 5], [2, 6], [2, 7]]  # after each save


SHARDED = """
import json, sys, torch, torch.distributed as dist
from math import nan
sys.path.insert(0, {tests!r})
import fxtrain as fx
from helpers import mlp
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
state = fx.shard(fx.TrainState.create(mlp((8, 16, 4)), fx.optim.adamw(1e-2)))
assert fx.sharding.is_sharded(state)
found = {{}}
for async_save in (False, True):
    with fx.checkpoint.CheckpointManager({dir!r} + str(async_save), keep_latest=1, keep_best=1,
                                         best_metric="loss", async_save=async_save) as m:
        found[async_save] = []
        for step, loss in enumerate({losses!r}, start=1):
            metrics = None if loss is None else {{"loss": loss}}
            m.save(state.replace(step=torch.tensor(step)), metrics)
            m.wait()
            found[async_save].append(m.all_steps())
dist.destroy_process_group()
print(json.dumps([found[False], found[True]]))
"""


# -- test_checkpoint_inspect.py's helpers ---------------------------------------------------------

def saved(tmp_path):
    cbs = [fx.callbacks.ema(0.9), fx.callbacks.timer(100.0)]
    state = fx.TrainState.create(mlp((8, 16, 4)), fx.optim.adamw(1e-2), callbacks=cbs)
    state = state.replace(callbacks={**state.callbacks, "timer": {"elapsed": 1.25}},
                          data=fx.data.DataPosition.start())
    with CheckpointManager(tmp_path, keep_latest=3, metadata={"lr": 0.01}) as m:
        for step, loss in ((5, 0.7), (10, 0.4)):
            m.save(state.replace(step=torch.tensor(step)), {"loss": loss})
    return state.replace(step=torch.tensor(10))
