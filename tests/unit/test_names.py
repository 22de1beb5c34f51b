"""The public names: one home each, old names that still work (with a warning), the writer
protocol, the helpers every callback shares, and ``__all__`` lists that hold what they say."""

import importlib
import types
import warnings

import pytest
import torch
from torch import nn

import fxtrain as fx
from helpers import extra
from fxtrain.callbacks.combinators import periodic
from fxtrain.logging.writer import WRITER_METHODS, check_writer, takes_binned_histograms

PACKAGES = ["fxtrain", "fxtrain.callbacks", "fxtrain.checkpoint", "fxtrain.logging",
            "fxtrain.optim", "fxtrain.tree", "fxtrain.debug", "fxtrain.distributed",
            "fxtrain.stats", "fxtrain.random", "fxtrain.metrics", "fxtrain.data"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_name_in_all_exists_and_is_documented(name):
    module = importlib.import_module(name)
    assert module.__all__, name
    for public in module.__all__:
        obj = getattr(module, public)  # raises if __all__ names something absent
        if isinstance(obj, types.FunctionType | type) and obj.__module__.startswith("fxtrain"):
            assert (obj.__doc__ or "").strip(), f"{name}.{public} has no docstring"


def test_packages_are_reachable_from_the_top():
    for name in ("callbacks", "checkpoint", "debug", "distributed", "logging", "optim", "tree",
                 "stats"):
        assert isinstance(getattr(fx, name), types.ModuleType)
    assert fx.tree.tree_digest is fx.tree_digest


@pytest.mark.parametrize("old, new", [
    ("checkpoint", lambda: fx.callbacks.checkpoint_policy),
    ("explain_step", lambda: fx.debug.explain_step),
    ("find_graph_breaks", lambda: fx.debug.find_graph_breaks),
    ("profiler", lambda: fx.debug.profiler)])
def test_old_callback_names_still_work_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match=f"fx.callbacks.{old} is now"):
        found = getattr(fx.callbacks, old)
    assert found is new()
    assert old not in fx.callbacks.__all__


def test_optim_tree_map_moved_to_tree_with_a_warning():
    with pytest.warns(DeprecationWarning, match="fx.tree.tree_map"):
        assert fx.optim.tree_map is fx.tree.tree_map
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fx.optim.nothing  # noqa: B018


def test_the_new_names_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fx.callbacks.checkpoint_policy(every=5)
        assert callable(fx.debug.profiler)


class _Scalars:
    def write_scalars(self, step, scalars):
        del step, scalars


def test_writers_satisfy_the_protocol_and_other_objects_do_not(tmp_path):
    assert isinstance(fx.logging.ConsoleWriter(), fx.logging.Writer)
    jsonl = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    assert isinstance(jsonl, fx.logging.Writer)
    assert isinstance(fx.logging.MultiWriter([jsonl]), fx.logging.Writer)
    assert not isinstance(_Scalars(), fx.logging.Writer)
    assert set(WRITER_METHODS) == {"write_scalars", "write_images", "write_videos",
                                   "write_audios", "write_texts", "write_histograms",
                                   "write_hparams", "flush", "close"}
    jsonl.close()


def test_check_writer_names_what_is_missing():
    check_writer(_Scalars(), "log_metrics", "write_scalars")
    with pytest.raises(TypeError, match=r"model_watch: _Scalars is not a writer: it has no "
                                        r"write_histograms"):
        check_writer(_Scalars(), "model_watch", "write_histograms", "write_scalars")
    with pytest.raises(TypeError, match="write_images, write_videos"):
        check_writer(_Scalars(), "anything")  # no methods named: all of Writer's


def test_binned_histograms_is_a_declared_capability(tmp_path):
    assert takes_binned_histograms(fx.logging.ConsoleWriter())
    assert not takes_binned_histograms(_Scalars())
    both = fx.logging.MultiWriter([fx.logging.ConsoleWriter(), _Scalars()])
    assert not takes_binned_histograms(both)  # one writer without it: samples for all


def test_set_callback_state_is_the_pair_of_callback_state():
    state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
                                 callbacks=[fx.callbacks.early_stopping("loss")])
    before = fx.callbacks.callback_state(state, "early_stopping")
    new = fx.callbacks.set_callback_state(state, "timer", {"elapsed": torch.tensor(1.0)})
    assert fx.callbacks.callback_state(new, "timer")["elapsed"] == 1.0
    assert fx.callbacks.callback_state(new, "early_stopping") is before
    assert "timer" not in state.callbacks  # a new state; the old one is unchanged


def test_periodic_is_the_one_test_of_every():
    due = periodic(5, "log_metrics")
    assert [s for s in range(12) if due(s)] == [0, 5, 10]
    assert due(torch.tensor(10)).dtype == torch.bool  # a tensor step gives a tensor
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="log_metrics: every must be a positive int"):
            periodic(bad, "log_metrics")
    with pytest.raises(ValueError, match="checkpoint_policy: every must be a positive int"):
        fx.callbacks.checkpoint_policy(every=0)
    with pytest.raises(ValueError, match="hf_callback: log_every must be a positive int"):
        transformers = extra("transformers")
        fx.callbacks.hf_callback(transformers.TrainerCallback(), log_every=0)


def test_rank_zero_helpers_without_a_process_group():
    calls = []
    wrapped = fx.distributed.rank_zero(lambda x: calls.append(x) or x + 1)
    assert wrapped(1) == 2 and calls == [1]
    assert fx.distributed.is_rank_zero()
    assert fx.distributed.rank_zero_then_broadcast(lambda: "done", "finish") == "done"
    with pytest.raises(KeyError):
        fx.distributed.rank_zero_then_broadcast(lambda: {}["missing"], "finish")
