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


def _adamw(names):
    return fx.optim.adamw(0.1, weight_decay=0.5, mask=names)


_WRAPPED = {  # a names mask inside each wrapper that holds a transformation
    "plain": _adamw,
    "chain": lambda names: fx.optim.chain(fx.optim.clip(10.0), _adamw(names)),
    "multi_steps": lambda names: fx.optim.multi_steps(_adamw(names), every_k=1),
    "apply_if_finite": lambda names: fx.optim.apply_if_finite(_adamw(names)),
    "lookahead": lambda names: fx.optim.lookahead(_adamw(names), sync_period=2,
                                                 slow_step_size=0.5),
    "schedule_free": lambda names: fx.optim.schedule_free(_adamw(names), 0.1),
    "masked": lambda names: fx.optim.masked(_adamw(names), lambda name, p: True),
    "multi_transform": lambda names: fx.optim.multi_transform({"all": _adamw(names)},
                                                        lambda name, p: "all"),
    "inject_hyperparams": lambda names: fx.optim.inject_hyperparams(fx.optim.adamw)(
        learning_rate=0.1, weight_decay=0.5, mask=names),
    "masked_by_names": lambda names: fx.optim.masked(fx.optim.adamw(0.1, weight_decay=0.5), names),
}


@pytest.mark.parametrize("wrapper", list(_WRAPPED))
def test_a_names_mask_reads_tied_names_through_every_wrapper_as_a_value(wrapper):
    """A mask naming the head of a tied embedding (transformers' decay names do) decays the one
    tensor the state keeps, through every wrapper, with the same bits as a mask naming the
    kept name; the state's transformation is resolved once (``fx.optim.masks.with_tied``), so
    calling it anywhere resolves alike, and the user's transformation, which knows no tied
    names, refuses the head's name wherever it is called (no scope changes it)."""
    from helpers_step import Tied

    def trained(names):
        torch.manual_seed(0)
        tx = _WRAPPED[wrapper](names)
        state = fx.TrainState.create(Tied(), tx, seed=0)
        grads = {k: torch.full_like(p, 0.01) for k, p in state.params.items()}
        for _ in range(3):
            state = state.apply_gradients(grads)
        return state, tx

    by_head, user_tx = trained(["head.weight"])
    by_kept, _ = trained(["emb.weight"])
    for k in by_kept.params:
        assert torch.equal(by_head.params[k], by_kept.params[k]), k
    untouched, _ = trained(["ln.weight"])  # the embedding does not decay: other bits
    assert not torch.equal(untouched.params["emb.weight"], by_head.params["emb.weight"])
    params = by_head.params
    again = by_head.tx.init(params)  # the state's transformation, called outside the state
    assert torch.utils._pytree.tree_structure(again) == \
        torch.utils._pytree.tree_structure(by_head.opt_state)
    with pytest.raises(ValueError, match=r"no parameter's: \['head.weight'\]"):
        user_tx.init(params)
    with pytest.raises(ValueError, match=r"no parameter's: \['head.wieght'\]"):
        trained(["head.wieght"])


def test_with_tied_leaves_a_transformation_without_a_names_mask_as_it_is():
    """Resolving tied names makes nothing new where no mask reads names: the state keeps the
    user's transformation itself."""
    from helpers_step import Tied
    tx = fx.optim.chain(fx.optim.clip(1.0), fx.optim.adamw(0.1, mask=lambda name, p: True))
    assert fx.TrainState.create(Tied(), tx).tx is tx
    named = fx.optim.adamw(0.1, mask=["head.weight"])
    assert fx.TrainState.create(Tied(), named).tx is not named
    assert fx.optim.masks.with_tied(named, ()) is named
