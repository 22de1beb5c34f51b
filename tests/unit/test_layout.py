"""The run's layout is a value of the state (``state.layout``, ``fx.distributed.Layout``), never a
process global: ``TrainState.create`` (and ``fx.shard``, on several ranks: test_tensor_parallel.py)
writes no module-level value of fxtrain, and states of other layouts, tied models and untied ones,
made in one process in either order, train as each does alone."""

import sys

import torch

import fxtrain as fx
from helpers_step import made, module_values


def test_create_writes_no_module_level_value_and_tied_names_are_the_states():
    made("untied")  # every module loaded, its caches made
    before = module_values()
    tied = made("tied")
    assert module_values() == before
    assert tied.layout.tied == (("emb.weight", "head.weight"),)
    assert made("untied").layout.tied == ()
    assert list(tied.params) == ["emb.weight", "ln.weight", "ln.bias"]


def test_a_layout_is_part_of_the_states_structure_not_its_leaves():
    state = made("tied")
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    again = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert again.layout is state.layout and again.module is state.module
    assert fx.distributed.data_world_size(state) == 1 and fx.distributed.data_rank(state) == 0
    assert fx.distributed.tensor_parallel_size(state) == 1
    assert state.replace(step=state.step + 1).layout is state.layout
