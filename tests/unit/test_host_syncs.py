"""The promise that the compiled step never syncs with the host and that ``fit`` reads device
values only at documented boundaries: every ``sync_every`` steps, evaluations, epoch ends,
checkpoints and the intervals of the callbacks that read.

Every count below is exact, and derived in comments from the code. Each ``fit`` count is asserted
for 100 and for 200 steps, so one stray read per step (100 vs 200 more) cannot hide in a
constant. ``HostReads`` (tests/syncs.py) says what counts as a read; reads of the data position
(CPU tensors by contract) are not counted.
"""

import io

import pytest
import torch
import torch._dynamo
from helpers import classification_batch, mlp, xent
from syncs import HostReads, graph_syncs, recording_backend

import fxtrain as fx

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)

X, Y = classification_batch(n=1600, seed=1)  # 100 batches of 16: an epoch ends at step 100
EVAL = classification_batch(n=64, seed=2)
BATCH = (X[:16], Y[:16])
STEPS = (100, 200)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops need no second thread; on a busy 2-core machine two threads wait on each other
    (a step here took 20x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_step_callbacks():
    """Tensor-maths callbacks, allowed inside the compiled step."""
    return [fx.callbacks.nan_guard("skip"),
            fx.callbacks.early_stopping("loss", patience=1000, event="step_end"),
            fx.callbacks.grad_monitor(5)]


VARIANTS = {"plain": ((), False), "grad_stats": ((), True),
            "in_step_callbacks": (in_step_callbacks(), False)}


def optimizer():
    """Adam on a schedule, so the state records a learning rate (for lr_monitor, summary)."""
    return fx.optim.adam(fx.optim.warmup_cosine_decay_schedule(
        0.0, 1e-2, warmup_steps=10, decay_steps=200))


def make(variant="plain", *, compiled=False, graphs=None):
    callbacks, grad_stats = VARIANTS[variant]
    state = fx.TrainState.create(mlp(), optimizer(), callbacks=callbacks)
    step = fx.make_train_step(xent, callbacks=callbacks, grad_stats=grad_stats)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=recording_backend(graphs))
    return state, step


def run_steps(step, state, n):
    for _ in range(n):
        state, metrics = step(state, BATCH)
    return state, metrics


# ---- the counter itself -------------------------------------------------------------------------

def test_host_reads_counts_what_moves_values_to_the_host():
    t, position = torch.tensor([1.5, 2.5]), fx.data.DataPosition.start()
    with HostReads() as reads:
        t.sum().item(), t.tolist(), float(t[0]), bool(t[0] > 0), f"{t.sum():.2f}"
        t.cpu().numpy(), t.to("cpu").sum().item()  # one copy each, then host values
        t[t > 2]  # a bool mask: the result's size is read from the device
        t.to(t.device), t.to(torch.device("cpu")), t.numpy(), len(t), t.shape, t * 2  # no reads
        int(position.epoch), int(position.index)  # the data position lives on the host
        torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()  # host-drawn
    assert reads.reads == ["item", "tolist", "__float__", "__bool__", "__format__", "cpu", "to",
                           "__getitem__"], reads.report()
    assert [r.kind for r in reads.calls][-3:] == ["transfer", "transfer", "sync"]
    assert all(r.where.startswith("tests/unit/test_host_syncs.py:") for r in reads.calls)
    assert [r.name for r in reads.ignored] == ["item", "__int__", "__int__", "tolist"]


def test_graph_syncs_finds_a_read_compiled_into_a_graph():
    graphs = []
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        f = torch.compile(lambda x: x * x.sum().item(), fullgraph=True,
                          backend=recording_backend(graphs))
        f(torch.ones(3))
    assert len(graphs) == 1 and graph_syncs(graphs[0])


# ---- the step ----------------------------------------------------------------------------------

def test_host_reads_costs_a_compiled_step_one_recompile_and_changes_nothing_in_it():
    """Dynamo guards on the torch-function mode stack: the first call under ``HostReads``
    compiles once more (once per mode type, not per instance). The mode steps aside while Dynamo
    traces, so that graph computes what the one traced without it does (its nodes may spell an
    op differently: ``x.add(y)`` for ``x + y``), with no graph break."""
    graphs = []
    state, step = make(compiled=True, graphs=graphs)
    state, _ = run_steps(step, state, 2)
    outside = step(state, BATCH)
    with HostReads():
        inside = step(state, BATCH)
    with HostReads():
        run_steps(step, state, 2)
    assert len(graphs) == 2 and not torch._dynamo.utils.counters["graph_break"]
    assert len(graphs[1].graph.nodes) == len(graphs[0].graph.nodes)
    assert fx.tree_digest(inside) == fx.tree_digest(outside)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_train_step_reads_nothing_from_the_host(variant):
    """Checked twice: the recording backend runs the graph's ops through ``HostReads`` (a read
    compiled into the graph, as Dynamo does for a used ``float(loss)``, is counted at each call),
    and ``graph_syncs`` looks for one in the graph itself, as Inductor would compile it."""
    graphs = []
    state, step = make(variant, compiled=True, graphs=graphs)
    with HostReads():  # warm-up: compiles (under the mode, as the counted calls run)
        state, _ = run_steps(step, state, 1)
    with HostReads() as reads, torch._dynamo.config.patch(error_on_recompile=True):
        state, metrics = run_steps(step, state, 20)
    assert reads.count == 0, reads.report()
    assert len(graphs) == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert graph_syncs(graphs[0]) == []  # no read compiled into the graph either
    assert int(state.step) == 21 and torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_train_step_reads_nothing_from_the_host(variant):
    state, step = make(variant)
    with HostReads() as reads:
        state, _ = run_steps(step, state, 5)
    assert reads.count == 0, reads.report()


def test_compiled_eval_step_and_evaluate_read_nothing_from_the_host():
    graphs = []
    state, _ = make()
    eval_step = torch.compile(fx.make_eval_step(xent), fullgraph=True,
                              backend=recording_backend(graphs))
    data = fx.data.Batches(EVAL, 32, shuffle=False)
    with HostReads():
        fx.evaluate(eval_step, state, data)
    with HostReads() as reads, torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            metrics = fx.evaluate(eval_step, state, data)  # averaged on device
    assert reads.count == 0, reads.report()
    assert len(graphs) == 1 and graph_syncs(graphs[0]) == []
    assert set(metrics) == {"loss", "accuracy"}


# ---- fit ----------------------------------------------------------------------------------------

def data():
    return fx.data.Batches((X, Y), 16, seed=0)


@pytest.mark.parametrize("steps", STEPS)
def test_fit_without_callbacks_reads_the_step_once(steps):
    state, step = make()
    with HostReads() as reads:
        state = fx.fit(state, step, data(), max_steps=steps, sync_every=50)
    # 1: int(state.step) when fit starts. Boundaries (every 50 steps, the epoch end at 100) read
    # nothing: no callback left a tensor flag to read. (The data position's reads are not
    # counted: it lives on the host.)
    assert reads.count == 1, reads.report()
    assert int(state.step) == steps


@pytest.mark.parametrize("sync_every", [25, 50])
@pytest.mark.parametrize("steps", STEPS)
def test_fit_reads_in_step_flags_once_per_sync(steps, sync_every):
    state, step = make("in_step_callbacks")
    with HostReads() as reads:
        fx.fit(state, step, data(), max_steps=steps, sync_every=sync_every)
    # 1 (int(state.step) at the start) + 1 per boundary: the in-step callbacks' control flags,
    # stacked and read in one transfer. Boundaries: every sync_every steps; the epoch end (step
    # 100) and the last step are among them.
    assert reads.count == 1 + steps // sync_every, reads.report()


def standard_callbacks(tmp_path, events):
    """What ``fxtrain demo`` runs, with every interval a divisor of 100."""
    writer = fx.logging.MultiWriter([fx.logging.TensorBoardWriter(tmp_path / "tb"),
                                     fx.logging.JsonlWriter(tmp_path / "metrics.jsonl")])
    return writer, [
        fx.callbacks.summary(file=io.StringIO()),
        fx.callbacks.progress_bar(["loss", "accuracy"], refresh_every=10, min_interval=0.0,
                                  file=io.StringIO()),
        fx.callbacks.early_stopping("loss", patience=1000, restore_best=True),
        fx.callbacks.checkpoint_policy(every=100, monitor="loss"),
        fx.callbacks.grad_monitor(100, writer=writer),
        fx.callbacks.lr_monitor(25, writer=writer),
        fx.callbacks.throughput(25, writer=writer),
        fx.callbacks.log_metrics(writer, 25, eval_prefix=None),
        fx.callbacks.log_eval_metrics(writer),
        fx.callbacks.log_hparams(writer, {"lr": 1e-2, "steps": 200}),
        lambda state, event: events.append((event.kind, event.step)),  # reads nothing
    ]


def expected_standard_reads(steps, saves):
    """The reads of ``fit`` with ``standard_callbacks``, eval_every=sync_every=50, by source."""
    boundaries = steps // 50  # sync, evaluation (and the epoch end at 100) fall together
    return sum([
        1,  # int(state.step) as fit starts
        1,  # summary: float(learning rate) at train_begin
        1,  # after train_begin: early_stopping's stop flag (a tensor), read at once
        1 + steps // 10,  # progress_bar: the shown metrics at step 1 and every 10 steps
        steps // 100,  # grad_monitor: the norms, every 100 steps
        steps // 25,  # lr_monitor: the learning rate, every 25 steps
        steps // 25,  # throughput: one value, waiting for the step, every 25 steps
        steps // 25,  # log_metrics: the interval's means, every 25 steps (so no interval is
        #               open at a checkpoint or at train_end)
        boundaries * 1,  # the in-step flags (nan_guard), in one transfer
        boundaries * 2,  # eval_end: progress_bar's line and log_eval_metrics (one read each;
        #                  evaluate itself averages on device)
        boundaries * 1,  # the flags eval_end raised (early_stopping's stop, checkpoint's save)
        saves * 4,  # each save: nan_guard's flag (flagged), int(state.step) twice in the
        #             manager (the step, the metadata) and the evaluation's metrics as floats
        2,  # the final save: flagged, then int(state.step) finds step `steps` already saved
    ])


@pytest.mark.parametrize("steps", STEPS)
def test_fit_with_the_standard_callbacks_reads_only_at_their_intervals(steps, tmp_path):
    in_step = [fx.callbacks.nan_guard("stop")]  # as the demo
    state = fx.TrainState.create(mlp(), optimizer(), callbacks=in_step)
    step = fx.make_train_step(xent, callbacks=in_step, grad_stats=True)
    events = []
    writer, callbacks = standard_callbacks(tmp_path, events)
    manager = fx.checkpoint.CheckpointManager(tmp_path / "checkpoints", keep_latest=2,
                                              keep_best=1, best_metric="loss")
    with HostReads() as reads:
        state = fx.fit(state, step, data(), max_steps=steps, sync_every=50,
                       eval_step=fx.make_eval_step(xent), eval_data=fx.data.Batches(
                           EVAL, 32, shuffle=False), eval_every=50, checkpoint=manager,
                       callbacks=callbacks)
    writer.close()
    saves = [s for kind, s in events if kind == "checkpoint"]
    # every 100 steps, and at evaluations that improved the loss (the first one, at 50, did)
    assert {50, *range(100, steps + 1, 100)} <= set(saves) <= set(range(50, steps + 1, 50))
    assert [s for kind, s in events if kind == "eval_end"] == list(range(50, steps + 1, 50))
    assert reads.count == expected_standard_reads(steps, len(saves)), reads.report()
    assert int(state.step) == steps and manager.latest_step() == steps
