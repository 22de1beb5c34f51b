"""``PendingFlags`` on its own, without ``fit``: requests are collected without a read and read
together, in one transfer, with the loss check riding along."""

import torch

import fxtrain as fx
from fxtrain.loop._flags import PendingFlags
from fxtrain.protocol import NOTHING, control_to_metrics, with_log_request
from syncs import HostReads


def step_metrics(loss=0.5, **control):
    """A step's metrics with its in-step callbacks' control on the wire."""
    return {"loss": torch.tensor(loss), **control_to_metrics(fx.Control(**control), "cpu")}


def test_python_requests_are_urgent_and_read_without_a_transfer():
    flags = PendingFlags()
    assert not flags.urgent()
    flags.add(fx.Control(save=True))
    assert flags.urgent()
    with HostReads() as reads:
        read = flags.read()
    assert reads.count == 0, reads.report()
    assert read.save is True and read.stop is False and not flags.urgent()


def test_tensor_requests_wait_and_are_read_in_one_transfer():
    flags = PendingFlags()
    with HostReads() as reads:
        for step in range(5):
            flags.add_step(step_metrics(stop=torch.tensor(step == 3),
                                        evaluate=torch.tensor(step == 1)))
        assert not flags.urgent()  # in-step flags wait for the next sync; nothing read yet
    assert reads.count == 0, reads.report()
    with HostReads() as reads:
        read = flags.read()
    assert reads.count == 1, reads.report()
    assert read == fx.Control(stop=True, evaluate=True)
    assert flags.read() == NOTHING  # read once, then gone


def test_a_host_callbacks_tensor_flag_is_read_at_once_with_the_pending_ones():
    flags = PendingFlags()
    flags.add_step(step_metrics(stop=torch.tensor(False)))
    flags.add(fx.Control(save=torch.tensor(True)))  # a host callback, due now, with a tensor
    assert flags.urgent()
    with HostReads() as reads:
        read = flags.read()
    assert reads.count == 1, reads.report()  # one transfer for both
    assert read == fx.Control(save=True) and not flags.urgent()
    several = PendingFlags(agree=True)  # one rank cannot start the collective read alone
    several.add(fx.Control(stop=torch.tensor(True)))
    assert not several.urgent()


def test_a_nonfinite_loss_is_found_by_the_read_that_happens_anyway():
    flags = PendingFlags()
    flags.add_step(step_metrics(loss=float("nan")))
    flags.add_step(step_metrics())
    assert not flags.nonfinite_loss
    with HostReads() as reads:
        flags.read()
    assert reads.count == 1 and flags.nonfinite_loss
    flags.add_step(step_metrics())
    flags.read()
    assert flags.nonfinite_loss  # stays raised once found


def test_without_pending_tensor_flags_the_losses_are_not_read():
    flags = PendingFlags()
    flags.add_step({"loss": torch.tensor(float("inf"))})  # no in-step callbacks: no flags
    with HostReads() as reads:
        assert flags.read() == NOTHING
    assert reads.count == 0 and not flags.nonfinite_loss


def test_sigterm_turns_the_next_read_into_a_stop():
    flags = PendingFlags()
    flags.signalled = True
    assert flags.urgent()
    read = flags.read()
    assert read.stop is True and flags.preempted


def test_the_loops_log_request_is_a_python_true_on_the_wire():
    metrics = with_log_request(step_metrics(log=False))
    assert metrics["control/log"] is True and fx.callbacks.core.asks_to_log(metrics)
    assert not fx.callbacks.core.asks_to_log(step_metrics(log=True))  # a tensor: needs a read
