"""FLOPs and MFU in ``throughput``, and ``system_monitor``: against hand counts, on the host."""

import logging
import os
import time

import pytest
import torch
from torch import nn

import fxtrain as fx
from fxtrain.callbacks import fold
from fxtrain.callbacks import system as system_module
from helpers import classification_batch, mlp, xent
from syncs import HostReads


class Recorder:
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, mapping):
        self.scalars.append((step, dict(mapping)))


def mse(state, params, batch):
    x, y = batch
    return ((state.apply(params, x) - y) ** 2).mean()


def test_count_step_flops_is_the_hand_count_of_an_mlp():
    b, sizes = 32, (8, 16, 12, 4)
    state = fx.TrainState.create(mlp(sizes), fx.optim.adamw(1e-3))
    batch = (torch.randn(b, sizes[0]), torch.randn(b, sizes[-1]))
    linears = [2 * b * n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    forward = sum(linears)
    # backward: each layer's weight gradient costs its forward again, and every layer but the
    # first the gradient of its input too (x needs none): 3x forward less the first layer's
    backward = 2 * forward - linears[0]
    assert fx.callbacks.count_step_flops(mse, state, batch) == forward + backward
    # a loss with aux (cross-entropy and softmax are not matrix products: they count 0)
    x, y = classification_batch(n=b, features=sizes[0])
    assert fx.callbacks.count_step_flops(xent, state, (x, y)) == forward + backward


def test_count_step_flops_is_3x_forward_when_the_input_needs_its_gradient_too():
    class Inputs(nn.Module):  # the input is a parameter: every layer's input gradient counts
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.randn(5, 6))
            self.net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))

        def forward(self):
            return self.net(self.x)

    state = fx.TrainState.create(Inputs(), fx.optim.sgd(0.1))
    flops = fx.callbacks.count_step_flops(lambda s, p, _: s.apply(p).square().sum(), state, None)
    assert flops == 3 * 2 * 5 * (6 * 7 + 7 * 3)


def test_count_step_flops_leaves_the_state_as_it_was():
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-3))
    before = fx.tree_digest(state)
    fx.callbacks.count_step_flops(xent, state, classification_batch())
    assert fx.tree_digest(state) == before and int(state.step) == 0


def run_throughput(cb, steps=4):
    """Folds ``cb`` over train_begin and ``steps`` step_ends."""
    state = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    state, _ = fold([cb], state, fx.Event("train_begin", 0, 0, {"batch_size": 8}))
    for s in range(1, steps + 1):
        state, _ = fold([cb], state, fx.Event("step_end", s, 0, {"loss": torch.tensor(1.0)}))


def readings(writer):
    got = {}
    for step, scalars in writer.scalars:
        for k, v in scalars.items():
            got.setdefault(k, []).append((step, v))
    return got


def test_throughput_reports_flops_per_sec_and_mfu_against_the_peak():
    writer, clock = Recorder(), iter([0.0, 1.0, 3.0])
    run_throughput(fx.callbacks.throughput(2, flops_per_step=1e12, peak_flops=4e12,
                                           writer=writer, time_fn=lambda: next(clock)))
    got = readings(writer)
    assert got["throughput/flops_per_sec"] == [(2, 2e12), (4, 1e12)]  # 2 steps in 1 s, in 2 s
    assert got["throughput/mfu"] == [(2, 0.5), (4, 0.25)]  # flops/s / peak


def test_throughput_without_a_peak_on_a_cpu_leaves_mfu_out(monkeypatch):
    writer, clock = Recorder(), iter([0.0, 1.0, 3.0])
    run_throughput(fx.callbacks.throughput(2, flops_per_step=100.0, writer=writer,
                                           time_fn=lambda: next(clock)))
    got = readings(writer)
    assert got["throughput/flops_per_sec"] == [(2, 200.0), (4, 100.0)]
    assert "throughput/mfu" not in got
    # on a GPU of the table, the peak of the device holding the parameters is used
    asked = []
    from fxtrain.callbacks import monitors
    monkeypatch.setattr(monitors, "device_peak_flops", lambda d: asked.append(d) or 400.0)
    writer, clock = Recorder(), iter([0.0, 1.0, 3.0])
    run_throughput(fx.callbacks.throughput(2, flops_per_step=100.0, writer=writer,
                                           time_fn=lambda: next(clock)))
    assert readings(writer)["throughput/mfu"] == [(2, 0.5), (4, 0.25)]
    assert asked == [torch.device("cpu")]


def test_throughput_refuses_bad_flops_and_a_peak_without_flops():
    with pytest.raises(ValueError, match="peak_flops needs flops_per_step"):
        fx.callbacks.throughput(peak_flops=1e12)
    with pytest.raises(ValueError, match="flops_per_step must be a positive number"):
        fx.callbacks.throughput(flops_per_step=-1)
    with pytest.raises(ValueError, match="peak_flops must be a positive number"):
        fx.callbacks.throughput(flops_per_step=1, peak_flops="989e12")


def test_device_peak_flops_knows_the_usual_gpus_by_name():
    peak = fx.callbacks.device_peak_flops
    assert peak("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA H100 NVL", torch.float32) == 60e12
    assert peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312e12
    assert peak("NVIDIA A100-PCIE-40GB", "tf32") == 156e12
    assert peak("NVIDIA L4") == 121e12 and peak("NVIDIA L40S") == 362e12
    assert peak("NVIDIA A10G") is None and peak("cpu") is None  # unknown, and no table
    if not torch.cuda.is_available():
        assert peak("cuda:0") is None and peak() is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        peak("NVIDIA H100 PCIe", torch.float64)


# --- system_monitor ---------------------------------------------------------------------------


def slow(state, event):  # steps of 20 ms or more: readings over windows the clocks resolve
    time.sleep(0.02)
    return state, fx.Control()


def fit_with(cb, steps=4):
    x = torch.randn(32, 2)
    state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
    return fx.fit(state, fx.make_train_step(mse), fx.data.Batches((x, x.sum(1, keepdim=True)), 4),
                  max_steps=steps, callbacks=[slow, cb])


def test_system_monitor_publishes_plausible_readings_when_due():
    writer = Recorder()
    fit_with(fx.callbacks.system_monitor(2, writer=writer))
    assert [step for step, _ in writer.scalars] == [2, 4, 4]  # due steps, then train_end
    first = writer.scalars[1][1]
    assert 0.0 <= first["system/cpu_percent"] <= 100.0
    assert 0.0 <= first["system/process_cpu_percent"] <= 100.0 * os.cpu_count() + 1.0
    assert 10.0 < first["system/process_rss_mib"] < 1e6
    assert 10.0 < first["system/ram_used_mib"] < 1e7 and 0.0 < first["system/ram_percent"] <= 100
    assert not any(k.startswith("system/gpu") for k in first)  # no CUDA in use


def test_system_monitor_reads_proc_without_psutil_and_agrees_with_it(monkeypatch):
    import psutil
    with_psutil, _ = system_module.system_usage()
    # the machine's busy share since boot, from /proc/stat and from psutil, a moment apart
    (busy, total), (ps_busy, ps_total) = (system_module._machine_cpu(None),
                                          system_module._machine_cpu(psutil))
    assert busy / total == pytest.approx(ps_busy / ps_total, abs=0.01)
    assert 0.0 < busy / total < 1.0
    monkeypatch.setattr(system_module, "_psutil", lambda: None)
    since = system_module.cpu_sample()
    start = time.process_time()
    while time.process_time() - start < 0.1:  # one core busy for 100 ms of CPU time
        pass
    without, _ = system_module.system_usage(since)
    assert 0.0 <= without["system/cpu_percent"] <= 100.0
    assert 10.0 < without["system/process_cpu_percent"] < 110.0  # of one core: at most 100
    assert without["system/ram_used_mib"] == pytest.approx(with_psutil["system/ram_used_mib"],
                                                           rel=0.2)
    assert without["system/ram_percent"] == pytest.approx(with_psutil["system/ram_percent"],
                                                          rel=0.2)


def test_system_monitor_leaves_machine_readings_out_where_there_is_no_proc(monkeypatch):
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(system_module, "_psutil", lambda: None)
    monkeypatch.setattr(system_module, "open", no_proc, raising=False)
    since = system_module.cpu_sample()
    sum(i * i for i in range(100_000))
    got, _ = system_module.system_usage(since)
    assert sorted(got) == ["system/process_cpu_percent", "system/process_rss_mib"]


def test_system_monitor_is_a_host_callback_that_reads_no_tensor():
    with pytest.raises(ValueError, match="'system_monitor' does IO.*fx.fit"):
        fx.make_train_step(xent, callbacks=[fx.callbacks.system_monitor()])
    cb = fx.callbacks.system_monitor(1, writer=Recorder())
    state = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    metrics = {"loss": torch.tensor(0.5), "grad_norm": torch.tensor(1.0)}
    with HostReads() as reads:
        for s in range(1, 4):
            state, _ = fold([cb], state, fx.Event("step_end", s, 0, metrics))
    assert reads.count == 0, reads.report()


def test_system_monitor_publishes_on_rank_zero_only(monkeypatch, caplog):
    from fxtrain import distributed
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    writer = Recorder()
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        fit_with(fx.callbacks.system_monitor(2, writer=writer))
        fit_with(fx.callbacks.system_monitor(2))
    assert writer.scalars == [] and not [r for r in caplog.records if "system" in r.message]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        fit_with(fx.callbacks.system_monitor(2))
    assert [r for r in caplog.records if "system:" in r.getMessage()]


def test_console_readings_go_above_a_bar_on_the_console_and_straight_out_otherwise(
        capsys, monkeypatch):
    """Without a writer or logging, readings go to standard error: through tqdm (clearing and
    redrawing the bars there) only when a bar is drawn on the console."""
    import io
    import sys

    from tqdm import tqdm

    from fxtrain.callbacks import publish as publishing
    from fxtrain.callbacks.publish import publish

    monkeypatch.setattr(publishing.logger, "hasHandlers", lambda: False)  # pytest sets logging up

    elsewhere = io.StringIO()
    with tqdm(total=10, file=elsewhere) as bar:
        bar.update(3)
        drawn = elsewhere.getvalue()
        publish(None, 5, {"a": 1.0}, what="test")
        assert elsewhere.getvalue() == drawn  # a bar in a file is left alone
    assert capsys.readouterr().err == "step 5 test: a=1\n"
    with tqdm(total=10, file=sys.stderr, mininterval=0) as bar:
        bar.update(3)
        capsys.readouterr()
        publish(None, 6, {"a": 2.0}, what="test")
        err = capsys.readouterr().err
    line = err.index("step 6 test: a=2")
    assert "3/10" in err[line:]  # the bar drawn again below the line
