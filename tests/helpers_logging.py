"""Child scripts and tensorboard's reader shared by the logging tests of several kinds
(tests/unit/test_logging_*.py, tests/e2e/test_logging_*_processes.py)."""

import textwrap

from helpers import extra


# -- test_logging_writers.py's helpers ------------------------------------------------------------

def read_tensorboard(logdir):
    """The run in ``logdir`` read back with tensorboard's own reader (the clu extra's)."""
    event_accumulator = extra("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0,
                                                                      "tensors": 0})
    acc.Reload()
    return acc


KILLED = """
import os, signal, sys, torch
import fxtrain as fx
w = fx.logging.JsonlWriter(sys.argv[1])
for step in range(100000):
    w.write_scalars(step, {"loss": 1.0 / (step + 1), "text": 0.0})
    if step == 200:
        print("ready", flush=True)
"""


# -- test_logging_interop.py's helpers ------------------------------------------------------------

CLU_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch._dynamo  # loads Triton (CUDA wheels) before TensorFlow: see docs/logging.md
    from absl import logging
    from clu import metric_writers
    import fxtrain as fx

    logging.set_verbosity(logging.INFO)  # clu's LoggingWriter logs at INFO

    path = sys.argv[1]
    jsonl = fx.logging.JsonlWriter(path)
    writer = metric_writers.MultiWriter([metric_writers.AsyncWriter(jsonl),
                                         metric_writers.LoggingWriter()])
    assert isinstance(writer, fx.logging.Writer)  # clu's writers qualify, knowing nothing of it
    state = fx.TrainState.create(torch.nn.Linear(4, 2), fx.optim.sgd(0.1))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    step = fx.make_train_step(lambda s, p, b: ((s.apply(p, b[0]) - b[1]) ** 2).mean())
    fx.fit(state, step, fx.data.Batches((x, y), 8), max_steps=10, callbacks=[
        fx.callbacks.log_metrics(writer, every=5),
        fx.callbacks.log_hparams(writer, {"lr": 0.1}),
        fx.callbacks.model_watch(writer, log="parameters", every=10)])
    writer.close()
    print("clu ok")
""")
