"""An elementwise optimizer's eager update of a sharded state runs on the local shards
(``fxtrain/optim/_on_shards.py``): the bits of an unsharded update, the layouts kept, and a
transformation that is not elementwise (a global norm clip) still updated through DTensor."""

import pytest
import torch
import torch.utils._pytree as pytree

import fxtrain as fx
from fxtrain.distributed import is_dtensor
from fxtrain.optim._on_shards import on_shards

OPTIMIZERS = {
    "adamw": lambda: fx.optim.adamw(1e-2, weight_decay=0.1),
    "sgd momentum": lambda: fx.optim.sgd(1e-2, momentum=0.9),
    "rmsprop centered momentum": lambda: fx.optim.rmsprop(1e-2, momentum=0.9, centered=True),
    "lion": lambda: fx.optim.lion(1e-3, weight_decay=0.1),
    # the same without its fused update: the elementwise path (on_shards) itself
    "sgd momentum (composable)": lambda: fx.optim.sgd(1e-2, momentum=0.9)._replace(fused=None),
    "clipped adam (not elementwise)": lambda: fx.optim.chain(fx.optim.clip_by_global_norm(0.1),
                                                             fx.optim.adam(1e-2)),
}


def _whole(tree):
    return [x.full_tensor() if hasattr(x, "full_tensor") else x for x in pytree.tree_leaves(tree)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_eager_update_of_a_sharded_state_on_its_local_shards_keeps_the_bits(one_rank, name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    tx = OPTIMIZERS[name]()
    plain = fx.TrainState.create(model, tx)
    sharded = fx.shard(fx.TrainState.create(model, tx))
    grads = {k: torch.ones_like(p) for k, p in sharded.params.items()}
    local = on_shards(tx, grads, sharded.opt_state, sharded.params)
    assert (local is None) == name.endswith("(not elementwise)")
    layouts = [(x.placements, x.shape) for x in pytree.tree_leaves(sharded.params)]
    for donate in (False, True, True):  # the second donated step writes into the state
        plain, _ = step(plain, batch, donate=donate)
        sharded, _ = step(sharded, batch, donate=donate)
    assert [(x.placements, x.shape) for x in pytree.tree_leaves(sharded.params)] == layouts
    for a, b in zip(_whole((sharded.params, sharded.opt_state)),
                    _whole((plain.params, plain.opt_state))):
        assert a is None and b is None or torch.equal(a, b)


def test_an_elementwise_transformation_whose_state_changes_structure_is_refused(one_rank):
    """Each new leaf of the state is rewrapped with the layout of the old leaf at its place, so
    a state that came back in another structure (its leaves as many, their keys other) would be
    rewrapped wrongly: refused, naming the two structures."""
    def init(params):
        return {"a": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(grads, state, params=None):
        return grads, {"b": state["a"]}

    tx = fx.optim.ElementwiseTransformation(init, update)
    model = torch.nn.Linear(4, 2)
    sharded = fx.shard(fx.TrainState.create(model, tx))
    grads = {k: torch.ones_like(p) for k, p in sharded.params.items()}
    with pytest.raises(RuntimeError, match="(?s)changed its structure.*make the transformation a "
                                           "plain GradientTransformation"):
        on_shards(tx, grads, sharded.opt_state, sharded.params)


@pytest.mark.parametrize("name", ["adamw", "sgd momentum", "rmsprop centered momentum", "lion",
                                  "sgd momentum (composable)"])
def test_an_update_written_into_the_shards_gives_back_the_dtensors_it_was_given(one_rank, name):
    """Given its state up (``InPlace``), the update writes into each leaf's local tensor, and the
    state it returns holds the same DTensors, not new wraps of those tensors (a ``from_local``
    per leaf per step, the dispatch this path is there to avoid). The fused AdamW, SGD, RMSprop
    and Lion and the elementwise path alike."""
    from fxtrain.optim.base import InPlace
    from fxtrain.optim.fused import apply_fused
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    tx = OPTIMIZERS[name]()
    sharded = fx.shard(fx.TrainState.create(model, tx))
    grads = {k: torch.ones_like(p) for k, p in sharded.params.items()}
    given = pytree.tree_leaves(sharded.opt_state)
    into = InPlace(sharded.opt_state, sharded.params)
    out = apply_fused(tx, grads, sharded.opt_state, sharded.params, None, into) \
        or on_shards(tx, grads, sharded.opt_state, sharded.params, into)
    kept = [(a, b) for a, b in zip(given, pytree.tree_leaves(out[1])) if is_dtensor(a)]
    assert kept and all(a is b for a, b in kept)
