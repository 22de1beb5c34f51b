"""fx.checkpoint: bit-exact round trips, restore into templates, retention, and bad input."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, CheckpointMismatchError
from helpers import classification_batch, mlp, xent
from helpers_checkpoint import make_state


def trained(state, steps=3, callbacks=()):
    step = fx.make_train_step(xent, callbacks=callbacks)
    for i in range(steps):
        state, _ = step(state, classification_batch(seed=i))
    return state


def at_step(state, n):
    return state.replace(step=torch.tensor(n))


# -- round trips -------------------------------------------------------------------------------

ODD_TENSORS = {
    "f32": torch.randn(3, 4),
    "f16": torch.randn(5).half(),
    "bf16": torch.randn(2, 3).bfloat16(),
    "f64": torch.randn(4, dtype=torch.float64),
    "i64": torch.arange(6),
    "i8": torch.tensor([-3, 7], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "zero_d": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "transposed": torch.arange(12.0).reshape(3, 4).t(),
    "strided": torch.arange(20.0)[::3],
    "nan_payloads": torch.tensor([0x7FC00001, 0x7FA00000, -1], dtype=torch.int32).view(
        torch.float32),
    "bf16_nan": torch.tensor([0x7FC1, 0xFF81 - 65536], dtype=torch.int16).view(torch.bfloat16),
    "inf": torch.tensor([float("inf"), -float("inf"), -0.0]),
    "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
}


def test_every_dtype_and_layout_round_trips_bit_exact(tmp_path):
    tree = {**ODD_TENSORS, "py_float": 0.1, "py_nan": float("nan"), "py_int": 2**70,
            "py_str": "hello", "py_bool": True, "none": None, "np_scalar": np.float32(1.5),
            "np_array": np.arange(4, dtype=np.int16)}
    fx.checkpoint.save(tmp_path / "c", tree)
    back = fx.checkpoint.restore(tmp_path / "c", like=tree)
    assert fx.tree_digest({k: v for k, v in back.items() if not k.startswith("np")}) == \
        fx.tree_digest({k: v for k, v in tree.items() if not k.startswith("np")})
    for k, v in ODD_TENSORS.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
    assert repr(back["py_nan"]) == "nan" and back["py_int"] == 2**70 and back["none"] is None
    assert back["np_scalar"].shape == () and back["np_scalar"] == np.float32(1.5)
    assert back["np_array"].dtype == np.int16


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32]),
       bits=st.integers(0, 2**16 - 1))
def test_round_trip_is_exact_for_random_bit_patterns(tmp_path_factory, shape, dtype, bits):
    g = torch.Generator().manual_seed(bits)
    raw = torch.randint(-2**15, 2**15, shape, dtype=torch.int32, generator=g)
    t = (raw.to(torch.int16).view(dtype) if dtype.itemsize == 2 else raw.view(dtype))
    path = tmp_path_factory.mktemp("rt") / "c"
    fx.checkpoint.save(path, {"t": t})
    assert fx.tree_digest(fx.checkpoint.restore(path, like={"t": t})) == fx.tree_digest({"t": t})


def test_a_trained_state_round_trips_and_keeps_training_identically(tmp_path):
    state = trained(make_state(dropout=0.2))
    fx.checkpoint.save(tmp_path / "c", state)
    back = fx.checkpoint.restore(tmp_path / "c", like=make_state(dropout=0.2))
    assert fx.tree_digest(back) == fx.tree_digest(state)
    assert fx.tree_digest(trained(back, 2)) == fx.tree_digest(trained(state, 2))


def test_restore_puts_tensors_on_the_templates_device_and_casts_only_when_asked(tmp_path):
    state = make_state()
    fx.checkpoint.save(tmp_path / "c", state)
    half = state.replace(params={k: v.half() for k, v in state.params.items()})
    with pytest.raises(CheckpointMismatchError, match=r"dtype of \.params\['0.weight'\].*cast=True"):
        fx.checkpoint.restore(tmp_path / "c", like=half)
    back = fx.checkpoint.restore(tmp_path / "c", like=half, cast=True)
    assert back.params["0.weight"].dtype == torch.float16
    assert torch.equal(back.params["0.weight"], state.params["0.weight"].half())
    meta_like = state.replace(params={k: v.to("meta") for k, v in state.params.items()})
    assert fx.checkpoint.restore(tmp_path / "c", like=meta_like).params["0.weight"].is_meta


# -- partial restore and changed callbacks ----------------------------------------------------

def test_partial_restore_of_params_into_a_state_with_another_optimizer(tmp_path):
    state = trained(make_state())
    fx.checkpoint.save(tmp_path / "c", state)
    other = make_state(tx=fx.optim.sgd(0.1, momentum=0.9))
    with pytest.raises(CheckpointMismatchError, match="opt_state"):
        fx.checkpoint.restore(tmp_path / "c", like=other)
    back = fx.checkpoint.restore(tmp_path / "c", like=other, only=("params", "buffers"))
    assert fx.tree_digest(back.params) == fx.tree_digest(state.params)
    assert fx.tree_digest(back.opt_state) == fx.tree_digest(other.opt_state)
    assert int(back.step) == 0  # only what was asked for
    with pytest.raises(ValueError, match=r"only='params': expected a sequence"):
        fx.checkpoint.restore(tmp_path / "c", like=other, only="params")
    with pytest.raises(ValueError, match=r"top-level fields \['buffers', 'callbacks'"):
        fx.checkpoint.restore(tmp_path / "c", like=other, only=("parms",))


def test_resuming_with_a_changed_callback_list(tmp_path):
    old = [fx.callbacks.ema(0.9), fx.callbacks.nan_guard("skip")]
    state = trained(make_state(callbacks=old), callbacks=old)
    fx.checkpoint.save(tmp_path / "c", state)
    new = [fx.callbacks.ema(0.9), fx.callbacks.grad_monitor()]
    template = make_state(callbacks=new)
    with pytest.warns(UserWarning, match="no longer present: nan_guard"):
        back = fx.checkpoint.restore(tmp_path / "c", like=template)
    assert fx.tree_digest(back.callbacks["ema"]) == fx.tree_digest(state.callbacks["ema"])
    assert fx.tree_digest(back.callbacks["grad_monitor"]) == \
        fx.tree_digest(template.callbacks["grad_monitor"])  # a new callback starts from init
    assert fx.tree_digest(back.params) == fx.tree_digest(state.params)


def test_a_mismatched_template_lists_every_differing_path_and_writes_nothing(tmp_path):
    fx.checkpoint.save(tmp_path / "c", make_state())
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*"))
    other = fx.TrainState.create(mlp((8, 32, 4, 4)), fx.optim.adamw(1e-2))
    with pytest.raises(CheckpointMismatchError) as e:
        fx.checkpoint.restore(tmp_path / "c", like=other)
    message = str(e.value)
    assert "missing from the checkpoint: .params['4.weight']" in message
    assert "shape of .params['0.weight']: checkpoint (16, 8), template (32, 8)" in message
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")) == before
    smaller = fx.TrainState.create(mlp((8, 4)), fx.optim.adamw(1e-2))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint: \.params\['2.bias'\]"):
        fx.checkpoint.restore(tmp_path / "c", like=smaller)


# -- the manager -------------------------------------------------------------------------------

def test_manager_keeps_latest_and_best_and_never_deletes_the_newest(tmp_path):
    state = make_state()
    losses = {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.7, 5: 0.8, 6: float("nan"), 7: 0.95}
    with CheckpointManager(tmp_path, keep_latest=2, keep_best=1, best_metric="loss") as m:
        for step, loss in losses.items():
            assert m.save(at_step(state, step), {"loss": torch.tensor(loss)})
        m.wait()
        assert m.all_steps() == [2, 6, 7] and m.latest_step() == 7 and m.best_step() == 2
        assert m.metrics(2)["loss"] == pytest.approx(0.2)
    # a new manager on the same directory (a resumed run) still knows the best
    with CheckpointManager(tmp_path, keep_latest=2, keep_best=1, best_metric="loss") as m:
        m.save(at_step(state, 8), {"loss": 0.3})
        m.wait()
        assert m.all_steps() == [2, 7, 8]
        m.save(at_step(state, 9), {"loss": 0.1})
        m.wait()
        assert m.all_steps() == [8, 9] and m.best_step() == 9


def test_manager_round_trip_latest_and_by_step_and_never_overwrites(tmp_path):
    a, b = make_state(), trained(make_state())
    with CheckpointManager(tmp_path / "ck", keep_latest=3, metadata={"lr": 0.01}) as m:
        assert m.save(at_step(a, 1)) and m.save(b)
        assert not m.save(b.replace(params=a.params))  # step 3 exists: not overwritten
        assert fx.tree_digest(m.restore(like=a)) == fx.tree_digest(b)
        assert fx.tree_digest(m.restore(like=a, step=1)) == fx.tree_digest(at_step(a, 1))
        assert m.info(3)["metadata"] == {"lr": 0.01}
        with pytest.raises(FileNotFoundError, match=r"step 2 .* available steps: \[1, 3\]"):
            m.restore(like=a, step=2)


def test_manager_save_needs_a_step(tmp_path):
    with pytest.raises(TypeError, match="numbers checkpoints by state.step; a dict has none"):
        CheckpointManager(tmp_path).save({"w": torch.ones(1)})


def test_save_interval_and_force(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path, save_interval_steps=5, async_save=False) as m:
        assert not m.save(at_step(state, 3))
        assert m.save(at_step(state, 3), force=True) and m.save(at_step(state, 5))
        assert m.all_steps() == [3, 5]


def test_clear_errors_for_missing_empty_and_foreign_directories(tmp_path):
    like = make_state()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "nope").restore(like)
    assert not (tmp_path / "nope").exists()  # reading never creates directories
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no fxtrain checkpoints in .*empty"):
        CheckpointManager(tmp_path / "empty").restore(like)
    foreign = tmp_path / "foreign"
    (foreign / "7").mkdir(parents=True)
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no fxtrain checkpoints .*holds: 7, notes.txt"):
        fx.checkpoint.restore(foreign, like=like)
    (foreign / "7" / "model.pt").write_bytes(b"torch")
    with pytest.raises(FileNotFoundError, match="no fxtrain checkpoints .*holds: model.pt"):
        fx.checkpoint.restore(foreign / "7", like=like)
    with pytest.raises(ValueError, match="notes.txt is not an fxtrain checkpoint"):
        fx.checkpoint.restore(foreign / "notes.txt", like=like)
    with pytest.raises(ValueError, match="keep_best needs best_metric"):
        CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="keep_latest must be an int >= 1"):
        CheckpointManager(tmp_path, keep_latest=0)


def test_unsupported_leaves_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"cannot checkpoint \[.fn.\]: a builtin_function_or_method is not a tensor"):
        fx.checkpoint.save(tmp_path / "c", {"fn": print})
    assert not (tmp_path / "c").exists()
    fx.checkpoint.save(tmp_path / "c", {"x": torch.ones(1)})
    with pytest.raises(FileExistsError, match="never overwrites"):
        fx.checkpoint.save(tmp_path / "c", {"x": torch.zeros(1)})


def _refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("where", ["check", "write"])
def test_a_directory_that_refuses_writes_raises_keeps_older_checkpoints_and_recovers(
        tmp_path, monkeypatch, where):
    """EACCES is faked (root ignores permissions, and chattr is not everywhere): either the
    directory looks read-only to the manager's check, or the write itself is refused midway."""
    state = make_state()
    with CheckpointManager(tmp_path / "ck", keep_latest=1) as m:
        m.save(at_step(state, 1))
        m.wait()
        with monkeypatch.context() as patch:
            if where == "check":
                real = os.access
                patch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) ==
                              m.directory else real(path, mode, **kw))
            else:
                patch.setattr(m._manager(), "save", _refuse)
            with pytest.raises(OSError, match="not writable" if where == "check" else
                               "step 2 .* failed \\(the older checkpoints are intact\\)"):
                m.save(at_step(state, 2))
                m.wait()
        assert m.all_steps() == [1]
        assert fx.tree_digest(m.restore(like=state)) == fx.tree_digest(at_step(state, 1))
        assert m.save(at_step(state, 3))  # writable again: saving works again
        m.wait()
        assert m.all_steps() == [3]


def test_a_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot create the checkpoint directory"):
        CheckpointManager(tmp_path / "file" / "sub").save(make_state())
    assert (tmp_path / "file").read_text() == "x"
