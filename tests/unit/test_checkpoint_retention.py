"""Retention: the newest ``keep_latest`` and the best ``keep_best`` by ``best_metric`` stay, the
newest is never deleted, and the rule is the same for orbax's checkpoints and sharded ones, for
synchronous and asynchronous saves, and after a checkpoint is damaged."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxtrain as fx
from fxtrain.checkpoint import CheckpointManager, layout, retention
from helpers import mlp
from helpers_checkpoint import LOSSES, NAN, SURVIVORS


def make_state():
    return fx.TrainState.create(mlp((8, 16, 4)), fx.optim.adamw(1e-2))


def reference(values, keep_latest, keep_best, mode):
    """The rule, spelled out: the newest ``keep_latest`` steps, then ``keep_best`` times the
    earliest step holding the best finite value not yet picked. ``values``: {step: metric}."""
    steps = sorted(values)
    keep = set(steps[-keep_latest:])
    ranked = [s for s in steps if values[s] is not None and math.isfinite(values[s])]
    for _ in range(min(keep_best, len(ranked))):
        target = (min if mode == "min" else max)(values[s] for s in ranked)
        first = next(s for s in ranked if values[s] == target)
        keep.add(first)
        ranked.remove(first)
    return keep


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_an_old_best_and_the_newest_are_exactly_what_stays(tmp_path, async_save, mode):
    sign = 1.0 if mode == "min" else -1.0
    state = make_state()
    with CheckpointManager(tmp_path, keep_latest=1, keep_best=1, best_metric="loss",
                           best_mode=mode, async_save=async_save) as m:
        for step, (loss, kept) in enumerate(zip(LOSSES, SURVIVORS), start=1):
            metrics = None if loss is None else {"loss": torch.tensor(sign * loss)}
            assert m.save(state.replace(step=torch.tensor(step)), metrics)
            m.wait()
            assert m.all_steps() == kept, step
        assert m.best_step() == 2


METRICS = st.one_of(st.none(), st.sampled_from([0.1, 0.2, 0.3, -1.0, NAN, math.inf]))
RULES = dict(keep_latest=st.integers(1, 3), keep_best=st.integers(0, 3),
             mode=st.sampled_from(["min", "max"]))


@settings(max_examples=300, deadline=None)
@given(metrics=st.lists(METRICS, max_size=12), gaps=st.lists(st.integers(1, 5), min_size=12),
       **RULES)
def test_the_rule_matches_the_reference(metrics, gaps, keep_latest, keep_best, mode):
    steps = [sum(gaps[:i + 1]) for i in range(len(metrics))]
    values = dict(zip(steps, metrics))
    ranked = {s: v for s, v in values.items() if v is not None}
    assert retention.kept(steps, ranked, keep_latest=keep_latest, keep_best=keep_best,
                          mode=mode) == reference(values, keep_latest, keep_best, mode)


@settings(max_examples=12, deadline=None)
@given(metrics=st.lists(METRICS, min_size=1, max_size=7), **RULES)
def test_a_manager_keeps_what_the_reference_keeps(tmp_path_factory, metrics, keep_latest,
                                                  keep_best, mode):
    """Retention runs after every save, on what the earlier ones left: the survivors are still
    the rule applied to the whole history."""
    state = make_state()
    directory = tmp_path_factory.mktemp("retention")
    with CheckpointManager(directory, keep_latest=keep_latest, keep_best=keep_best,
                           best_metric="loss", best_mode=mode, async_save=False) as m:
        for step, value in enumerate(metrics, start=1):
            m.save(state.replace(step=torch.tensor(step)),
                   None if value is None else {"loss": value})
        values = dict(enumerate(metrics, start=1))
        assert set(m.all_steps()) == reference(values, keep_latest, keep_best, mode)


def test_a_damaged_description_does_not_rank_and_retention_goes_on(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path, keep_latest=1, keep_best=1, best_metric="loss",
                           async_save=False) as m:
        m.save(state.replace(step=torch.tensor(1)), {"loss": 0.1})
        m.save(state.replace(step=torch.tensor(2)), {"loss": 0.5})
        assert m.all_steps() == [1, 2]
        (tmp_path / "1" / layout.META / layout.JSON_ITEM).write_text('{"leaves": [')
        assert m.save(state.replace(step=torch.tensor(3)), {"loss": 0.4})
        assert m.all_steps() == [3]  # the best that can still be read, and the newest


def test_a_description_this_process_may_not_read_is_left_alone(tmp_path, monkeypatch):
    """Not damage (permissions, an I/O error): nothing is known of its metric, so it stays."""
    state = make_state()
    real = layout.read_meta

    def read_meta(path):
        if path.name == "1":
            raise layout.unreadable(path, 13, "its description cannot be opened")
        return real(path)

    monkeypatch.setattr(layout, "read_meta", read_meta)
    with CheckpointManager(tmp_path, keep_latest=1, keep_best=1, best_metric="loss",
                           async_save=False) as m:
        for step, loss in [(1, 0.9), (2, 0.5), (3, 0.1), (4, 0.4)]:
            m.save(state.replace(step=torch.tensor(step)), {"loss": loss})
        assert m.all_steps() == [1, 3, 4]


def test_an_error_of_retention_itself_does_not_fail_the_save(tmp_path, monkeypatch):
    """Whatever retention raises, the new checkpoint is on disk: a warning, not a failed save."""
    state = make_state()

    def broken(*args, **kwargs):
        raise ValueError("a description's metrics are not a mapping")

    monkeypatch.setattr(retention, "metric_values", broken)
    with CheckpointManager(tmp_path, keep_latest=1, keep_best=1, best_metric="loss",
                           async_save=False) as m:
        m.save(state.replace(step=torch.tensor(1)), {"loss": torch.tensor(1.0)})
        with pytest.warns(RuntimeWarning, match="step 2 is saved.*ValueError: a description"):
            assert m.save(state.replace(step=torch.tensor(2)), {"loss": torch.tensor(2.0)})
        assert m.all_steps() == [1, 2]
