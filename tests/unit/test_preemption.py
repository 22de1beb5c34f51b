"""SIGTERM during ``fit``: save, train_end with reason "preempted", exit code 143 (here in one
process; two ranks, one of them terminated, then resumed, in tests/unit/test_distributed.py)."""

import os
import signal

import pytest
import torch

import fxtrain as fx
from helpers import FakeManager, mlp, xent

X = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def needs_default_sigterm():
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process has its own SIGTERM handler; fit leaves it alone")


def test_sigterm_saves_the_step_it_arrives_at_and_raises_preempted_with_code_143():
    needs_default_sigterm()
    ends, manager = [], FakeManager()

    def terminate_at_3(state, event):
        if event.kind == "step_end" and event.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only raises a flag
        if event.kind == "train_end":
            ends.append(event.metrics["reason"])

    state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1), seed=0)
    with pytest.raises(fx.Preempted) as raised:
        fx.fit(state, fx.make_train_step(xent), fx.data.Batches((X, Y), 16), max_steps=20,
               callbacks=[terminate_at_3], checkpoint=manager)
    assert raised.value.code == 143 and int(raised.value.state.step) == 3
    assert manager.saved == [3] and ends == ["preempted"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_a_handler_of_the_programs_own_is_left_in_place():
    needs_default_sigterm()
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        def terminate_at_2(state, event):
            if event.kind == "step_end" and event.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        state = fx.TrainState.create(mlp((8, 16, 2)), fx.optim.sgd(0.1), seed=0)
        end = fx.fit(state, fx.make_train_step(xent), fx.data.Batches((X, Y), 16), max_steps=4,
                     callbacks=[terminate_at_2])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM] and int(end.step) == 4
