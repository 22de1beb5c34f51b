"""``Control``'s flags by name: the partition that says which flag travels where, and the wire
round trip (``control_to_metrics`` -> ``control_from_metrics`` -> ``PendingFlags``) mapping each
flag to its own name, whatever the position of ``Control``'s fields."""

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtrain as fx
from fxtrain import protocol, struct
from fxtrain.loop import _flags
from fxtrain.loop._flags import READ_FLAGS, PendingFlags
from fxtrain.protocol import (APPLIED_FLAGS, CONTROL_KEYS, FLAGS, HOST_FLAGS, IN_STEP_FLAGS,
                              control_from_metrics, control_to_metrics)
from helpers import TRACED, graph_count

# a flag: a Python bool (host) or a 0-d bool tensor (computed with tensor maths)
FLAG = st.one_of(st.booleans(), st.booleans().map(torch.tensor))
CONTROLS = st.fixed_dictionaries({name: FLAG for name in FLAGS}).map(lambda kw: fx.Control(**kw))


def test_the_flags_are_controls_fields_partitioned_in_declaration_order():
    """A new field must be put in one of the partitions; the in-step requests come first, so a
    positional ``Control(stop, save, evaluate, log, skip)`` keeps its meaning."""
    assert FLAGS == tuple(field.name for field in dataclasses.fields(fx.Control))
    assert IN_STEP_FLAGS + APPLIED_FLAGS + HOST_FLAGS == FLAGS
    assert IN_STEP_FLAGS == ("stop", "save", "evaluate", "log")
    assert READ_FLAGS == IN_STEP_FLAGS + HOST_FLAGS  # what a read returns and ranks agree on
    assert CONTROL_KEYS == ("control/stop", "control/save", "control/evaluate", "control/log")
    assert fx.Control(True, False, True, False, True) == fx.Control(stop=True, evaluate=True,
                                                                    skip=True)
    assert protocol.flags(fx.Control(save=True, abort=True)) == tuple(
        name in ("save", "abort") for name in FLAGS)


# ``Control`` with a field planted in front of its flags (every one of them, read from its
# fields): a positional reader of the wire would hand each flag's value to its left neighbour.
_PLANTED = ("planted", *FLAGS)
Planted = struct.dataclass(type("Planted", (), {
    "__annotations__": dict.fromkeys(_PLANTED, Any), **dict.fromkeys(_PLANTED, False),
    "__or__": fx.Control.__or__}))


@pytest.fixture
def planted(monkeypatch):
    """The wire's modules building ``Planted`` values where they build a ``Control``."""
    nothing = Planted()
    for module in (protocol, _flags):
        monkeypatch.setattr(module, "Control", Planted)
        monkeypatch.setattr(module, "NOTHING", nothing)
    return nothing


def test_a_field_planted_in_front_travels_by_name_through_the_metrics(planted):
    metrics = control_to_metrics(Planted(planted=True, stop=True, evaluate=True, skip=True),
                                 "cpu")
    assert {k: v.item() for k, v in metrics.items()} == {
        "control/stop": True, "control/save": False, "control/evaluate": True,
        "control/log": False}
    back = control_from_metrics(metrics)
    assert type(back) is Planted
    assert {name: bool(getattr(back, name)) for name in ("planted", *FLAGS)} == {
        "planted": False, "stop": True, "save": False, "evaluate": True, "log": False,
        "skip": False, "stop_epoch": False, "abort": False}


@pytest.mark.parametrize("agree", [False, True])
def test_a_field_planted_in_front_is_read_and_agreed_by_name(planted, agree):
    flags = PendingFlags(agree=agree)
    flags.add_step({"loss": torch.tensor(0.5),
                    **control_to_metrics(Planted(log=torch.tensor(True)), "cpu")})
    flags.add(Planted(evaluate=torch.tensor(True)))  # a host callback's tensor flag
    flags.add(Planted(save=True, stop_epoch=True))  # and its Python flags
    read = flags.read()
    assert type(read) is Planted
    assert {name: getattr(read, name) for name in ("planted", *FLAGS)} == {
        "planted": False, "stop": False, "save": True, "evaluate": True, "log": True,
        "skip": False, "stop_epoch": True, "abort": False}


@settings(max_examples=100, deadline=None)
@given(CONTROLS)
def test_the_in_step_flags_round_trip_through_the_metrics_and_a_read(control):
    metrics = control_to_metrics(control, "cpu")
    assert tuple(metrics) == CONTROL_KEYS
    assert all(v.dtype == torch.bool and v.shape == () for v in metrics.values())
    back = control_from_metrics(metrics)
    for name in FLAGS:
        sent = bool(getattr(control, name)) if name in IN_STEP_FLAGS else False
        assert bool(getattr(back, name)) == sent, name  # the others do not travel
    flags = PendingFlags()
    flags.add_step(metrics)
    assert flags.read() == fx.Control(**{name: bool(getattr(control, name))
                                         for name in IN_STEP_FLAGS})


def test_the_wire_compiles_as_one_graph_and_keeps_it():
    def step(x):  # what a step does with its in-step callbacks' controls
        merged = fx.Control(stop=x > 1) | fx.Control(log=x < 0, skip=x.isnan())
        merged = merged | control_from_metrics(control_to_metrics(merged, x.device))
        return control_to_metrics(merged, x.device)

    compiled = torch.compile(step, backend=TRACED, fullgraph=True)
    before = graph_count()
    for x in (2.0, -1.0, 0.5):
        got = compiled(torch.tensor(x))
        assert {k: v.item() for k, v in got.items()} == {
            k: v.item() for k, v in step(torch.tensor(x)).items()}
    assert graph_count() - before == 1
