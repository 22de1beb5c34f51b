"""Parameter groups: multi_transform (partition), masked and set_to_zero equal optax's in float64,
two groups equal torch.optim's param groups, frozen parameters stay bitwise unchanged, one graph
under torch.compile, the state survives a checkpoint, and bad labels are refused by name."""

import pytest
import torch

import fxtrain as fx
from fxtrain import optim

import optax_parity as parity
from helpers import classification_batch, extra, mlp, xent

LABELS = {"w": "a", "b": "b", "s": "a"}


def _by_label(name, p):  # the same labels as LABELS, from a predicate
    return "b" if name == "b" else "a"


# name -> (ours, optax's), both given the optax module
OPTAX = {
    "adam_sgd": (lambda: optim.multi_transform({"a": optim.adam(0.02), "b": optim.sgd(0.1, 0.9)},
                                               LABELS),
                 lambda o: o.multi_transform({"a": o.adam(0.02), "b": o.sgd(0.1, 0.9)}, LABELS)),
    "adamw_frozen": (
        lambda: optim.multi_transform({"a": optim.adamw(0.02, weight_decay=0.1),
                                       "b": optim.set_to_zero()}, _by_label),
        lambda o: o.multi_transform({"a": o.adamw(0.02, weight_decay=0.1), "b": o.set_to_zero()},
                                    LABELS)),
    "partition": (lambda: optim.partition({"a": optim.sgd(0.1), "b": optim.adam(0.02)}, LABELS),
                  lambda o: o.partition({"a": o.sgd(0.1), "b": o.adam(0.02)}, LABELS)),
    "masked": (lambda: optim.chain(optim.masked(optim.scale_by_adam(), {"w": True, "b": False,
                                                                        "s": True}),
                                   optim.scale(-0.02)),
               lambda o: o.chain(o.masked(o.scale_by_adam(), {"w": True, "b": False, "s": True}),
                                 o.scale(-0.02))),
    "masked_predicate": (
        lambda: optim.masked(optim.adamw(0.02, weight_decay=0.1), lambda name, p: p.ndim > 0),
        lambda o: o.masked(o.adamw(0.02, weight_decay=0.1), {"w": True, "b": True, "s": False})),
}


@pytest.mark.parametrize("name", OPTAX)
def test_equals_optax_in_float64(name, x64):
    optax = extra("optax")
    ours, theirs = OPTAX[name]
    params = parity.params()
    grads = parity.grads(params)
    a, b = parity.run_fx(ours(), params, grads), parity.run_optax(theirs(optax), params, grads)
    assert all(b[k].dtype == torch.float64 for k in b)
    assert parity.max_diff(a, params) > 1e-3, f"{name} hardly moved the parameters"
    diff = parity.max_diff(a, b)
    assert diff <= 1e-7, f"{name}: max |dparam| vs optax = {diff:.3g} after {parity.STEPS} steps"


def test_state_holds_each_group_alone():
    tx = OPTAX["adam_sgd"][0]()
    state = tx.init(parity.params())
    assert isinstance(state, optim.MultiTransformState)
    assert list(state.inner_states) == ["a", "b"]
    assert set(state.inner_states["a"][0].mu) == {"w", "s"}   # adam's moments: group a only
    assert optim.PartitionState is optim.MultiTransformState
    masked = optim.masked(optim.scale_by_adam(), {"w": True, "b": False, "s": False})
    assert set(masked.init(parity.params()).inner_state.mu) == {"w"}


def test_frozen_group_is_bitwise_unchanged_through_train_steps():
    tx = optim.multi_transform({"train": optim.adamw(1e-2, weight_decay=0.1),
                                "frozen": optim.set_to_zero()},
                               lambda name, p: "frozen" if name.startswith("0.") else "train")
    state = fx.TrainState.create(mlp(), tx)
    before = {k: v.clone() for k, v in state.params.items()}
    step = fx.make_train_step(xent)
    for seed in range(3):
        state, _ = step(state, classification_batch(seed=seed))
    for k, old in before.items():
        assert torch.equal(state.params[k], old) == k.startswith("0."), k


def test_parity_with_torch_optim_param_groups():
    params = parity.params(torch.float32)
    grads = parity.grads(params, 5)
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW([
        {"params": [tensors["w"], tensors["s"]], "lr": 0.02},
        {"params": [tensors["b"]], "lr": 0.005},
    ], weight_decay=0.1, eps=1e-8)
    for grad in grads:
        for k, t in tensors.items():
            t.grad = grad[k].clone()
        opt.step()
    tx = optim.multi_transform({"a": optim.adamw(0.02, weight_decay=0.1),
                                "b": optim.adamw(0.005, weight_decay=0.1)}, LABELS)
    diff = parity.max_diff(parity.run_fx(tx, params, grads), {k: v.detach() for k, v in tensors.items()})
    assert diff <= 1e-6, f"max |dparam| vs torch.optim param groups = {diff:.3g}"


def test_compiles_to_one_graph_without_recompiling():
    tx = optim.multi_transform(
        {"a": optim.masked(optim.adamw(0.02), lambda name, p: p.ndim == 2),
         "b": optim.sgd(0.1, 0.9), "frozen": optim.set_to_zero()},
        {"w": "a", "b": "b", "s": "frozen"})
    params = parity.params(torch.float32)
    grads = parity.grads(params, 3)
    ours = parity.run_compiled(tx, params, grads)
    assert parity.max_diff(ours, parity.run_fx(tx, params, grads)) <= 1e-6
    assert torch.equal(ours["s"], params["s"])


def test_state_survives_a_checkpoint(tmp_path):
    def make():
        return optim.multi_transform(
            {"weights": optim.adamw(1e-2), "biases": optim.masked(optim.sgd(0.1, 0.9), {
                "0.bias": True, "2.bias": False}), "frozen": optim.set_to_zero()},
            lambda name, p: "frozen" if name == "2.weight" else (
                "biases" if name.endswith("bias") else "weights"))

    restored = parity.checkpoint_round_trip(make, mlp, tmp_path)
    assert isinstance(restored.opt_state, optim.MultiTransformState)


@pytest.mark.parametrize("make,match", [
    (lambda: optim.multi_transform({"a": optim.sgd(0.1)}, {"w": "a", "b": "c", "s": "a"}),
     r"labels with no transform: \{'c': \['b'\]\}"),
    (lambda: optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.1),
                                    "typo": optim.set_to_zero()}, LABELS),
     r"transforms that no parameter uses: \['typo'\]"),
    (lambda: optim.multi_transform({"a": optim.sgd(0.1)}, {"w": "a", "s": "a"}),
     r"parameters with no entry: \['b'\]"),
    (lambda: optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.1)},
                                   {**LABELS, "x": "a"}),
     r"entries for no parameter: \['x'\]"),
    (lambda: optim.masked(optim.sgd(0.1), lambda name, p: False), "selects none of the parameters"),
    (lambda: optim.masked(optim.sgd(0.1), {"w": True}), r"parameters with no entry: \['b', 's'\]"),
])
def test_bad_labels_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make().init(parity.params())


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one transform"):
        optim.multi_transform({}, LABELS)
    tx = optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.1)}, LABELS)
    with pytest.raises(TypeError, match="flat dict"):
        tx.init([torch.zeros(1)])
    other = optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.1), "c": optim.sgd(0.1)},
                                  lambda name, p: {"w": "a", "b": "b", "s": "c"}[name])
    with pytest.raises(ValueError, match="another optimizer"):
        tx.update(parity.grads(parity.params(), 1)[0], other.init(parity.params()), parity.params())
