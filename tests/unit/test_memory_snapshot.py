"""Memory in ``fit``: ``fx.callbacks.memory_snapshot`` on the CPU (the state's accounting and a
measured peak, and why there is no allocator history), and an out-of-memory error inside a run
(simulated: a loss that raises ``torch.OutOfMemoryError`` at step k): the note says what the
step held and which levers exist, and the checkpoints saved before stay."""

import json

import pytest
import torch
from torch import nn

import fxtrain as fx
from fxtrain._memory import held
from helpers import TRACED, graph_count


def _run(k=None, *, compiled=False):
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    data = fx.data.Batches((x, x.sum(1, keepdim=True)), 32, seed=0)
    state = fx.TrainState.create(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)),
                                 fx.optim.adamw(1e-3), seed=0)

    def loss_fn(state, params, batch):
        if k is not None and int(state.step) == k - 1:  # eager: the step that makes step k
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        x, y = batch
        return ((state.apply(params, x) - y) ** 2).mean()

    step = fx.make_train_step(loss_fn)
    if compiled:  # the callback's promise is the trace's (one graph, the accounting): TRACED
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    return state, step, data


def test_callback_on_the_cpu_writes_the_accounting(tmp_path, capsys):
    state, step, data = _run(compiled=True)
    path = tmp_path / "snap" / "memory.pickle"
    torch._dynamo.utils.counters.clear()
    state = fx.fit(state, step, data, max_steps=5, progress=False,
                   callbacks=[fx.callbacks.memory_snapshot(3, path, skip=1)])
    assert "fxtrain: memory of steps 2 to 4 (cpu)" in capsys.readouterr().out
    assert graph_count() == 1  # profiling the steps recompiles nothing
    assert not path.exists()  # no allocator history on the CPU
    written = json.loads(path.with_suffix(".json").read_text())
    params = 4 * (16 * 64 + 64 + 64 + 1)
    assert written["parameters"] == written["gradients"] == params
    assert written["optimizer"] == fx.sharding.local_nbytes(state.opt_state) > 2 * params
    assert written["buffers"] == 0 and written["steps"] == [2, 4]
    assert written["peak"] >= params and written["activations"] == written["peak"] - params
    assert "needs CUDA" in written["history"] or "CUDA only" in written["history"]
    with pytest.raises(ValueError, match="steps >= 1"):
        fx.callbacks.memory_snapshot(0)


@pytest.mark.parametrize("with_callback", [False, True])
def test_out_of_memory_in_fit_says_what_the_step_held(tmp_path, with_callback):
    state, step, data = _run(k=5)
    accounting = held(state)  # (fit donates the state it is given)
    manager = fx.checkpoint.CheckpointManager(tmp_path / "ckpt", keep_latest=10,
                                              async_save=False)
    callbacks = [fx.callbacks.checkpoint_policy(every=2)]
    if with_callback:
        callbacks.append(fx.callbacks.memory_snapshot(2, tmp_path / "m.pickle", skip=1))
    with pytest.raises(torch.OutOfMemoryError) as raised:
        fx.fit(state, step, data, max_steps=10, checkpoint=manager, callbacks=callbacks,
               progress=False)
    notes = "\n".join(raised.value.__notes__)
    assert "fxtrain: out of memory in the train step from step 4 on cpu" in notes
    for part in ("parameters", "gradients", "optimizer state", "buffers",
                 "activations and temporaries"):
        assert part in notes
    assert f"optimizer state {accounting.optimizer / 1024:.1f} KiB" in notes
    assert "no snapshot: the CPU has no allocator history" in notes
    for lever in ("fx.remat", "fx.losses.chunked_causal_lm", "fx.shard", "a smaller batch",
                  "fx.find_batch_size"):
        assert lever in notes
    assert notes.count("fxtrain: out of memory") == 1  # once, callback or not
    if with_callback:  # it measured steps 2 and 3 before the failure
        assert "activations and temporaries not measured" not in notes
    else:
        assert "activations and temporaries not measured" in notes
    # nothing saved is lost: the checkpoints before the failure are there and restore to the
    # run's own states
    assert manager.latest_step() == 4
    again, step2, data2 = _run()
    again = fx.fit(again, step2, data2, max_steps=4, progress=False)
    restored = manager.restore(like=again)
    assert fx.tree_digest(restored) == fx.tree_digest(again)


def test_issue_75_an_unusable_path_is_refused_when_the_callback_is_made(tmp_path):
    """A directory, or a path under a file, ended the training run at the recording's end
    (IsADirectoryError, FileExistsError through fit); now refused by name before any step."""
    (tmp_path / "adir.json").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        fx.callbacks.memory_snapshot(2, tmp_path)
    with pytest.raises(ValueError, match="adir.json is a directory"):
        fx.callbacks.memory_snapshot(2, tmp_path / "adir.pickle")
    with pytest.raises(ValueError, match="afile is a file, so .* cannot be written under it"):
        fx.callbacks.memory_snapshot(2, tmp_path / "afile" / "deeper" / "m.pickle")


def test_issue_75_a_path_gone_bad_during_the_run_is_said_and_training_goes_on(tmp_path):
    state, step, data = _run()
    path = tmp_path / "m.pickle"
    snapshot = fx.callbacks.memory_snapshot(2, path)
    path.with_suffix(".json").mkdir()  # made after the callback: the write fails
    with pytest.warns(UserWarning, match="could not write .*m.json.*training goes on"):
        state = fx.fit(state, step, data, max_steps=5, progress=False, callbacks=[snapshot])
    assert int(state.step) == 5


def test_issue_75_a_run_shorter_than_the_window_writes_what_it_saw_and_says_so(tmp_path):
    state, step, data = _run()
    path = tmp_path / "m.pickle"
    with pytest.warns(UserWarning, match="the run ended 4 steps into the 50 asked; wrote those"):
        fx.fit(state, step, data, max_steps=5, progress=False,
               callbacks=[fx.callbacks.memory_snapshot(50, path)])
    assert json.loads(path.with_suffix(".json").read_text())["steps"] == [2, 5]
    state, step, data = _run()
    with pytest.warns(UserWarning, match="before the recording began .*nothing was written"):
        fx.fit(state, step, data, max_steps=2, progress=False,
               callbacks=[fx.callbacks.memory_snapshot(2, tmp_path / "n.pickle", skip=3)])
