import gc
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtrain as fx
from helpers import classification_batch, convnet, mlp, xent


def _snapshot(state):
    return [t.clone() for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]


def _unchanged(state, snapshot):
    leaves = [t for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    return all(torch.equal(a, b) for a, b in zip(leaves, snapshot))


def test_create_copies_params_and_buffers():
    model = convnet()
    state = fx.TrainState.create(model, fx.optim.adamw(1e-3), seed=3)
    assert state.step.dtype == torch.int64 and state.step.ndim == 0 and int(state.step) == 0
    assert set(state.params) == {n for n, _ in model.named_parameters()}
    assert set(state.buffers) == {n for n, _ in model.named_buffers()}
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p) and not state.params[name].requires_grad
        assert state.params[name].data_ptr() != p.data_ptr()
    assert state.data is None and state.callbacks is None


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (as GPT-2's lm_head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.embed(tokens))


def test_the_state_holds_the_only_weights_and_its_module_is_a_skeleton():
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    skeleton = state.module
    assert skeleton is not model and type(skeleton) is Tied
    assert all(p.is_meta for p in skeleton.parameters())  # no storage
    assert skeleton.out.weight is skeleton.embed.weight and list(state.params) == ["embed.weight"]
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(state.apply(state.params, tokens), model(tokens))
    with pytest.raises(RuntimeError, match="weightless skeleton of a TrainState.*state.apply"):
        skeleton(tokens)
    weight = weakref.ref(model.embed.weight)
    del model
    gc.collect()
    assert weight() is None  # the state keeps no reference to the model's own tensors


def test_frozen_parameters_become_buffers():
    model = mlp()
    model[0].weight.requires_grad_(False)
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    assert "0.weight" in state.buffers and "0.weight" not in state.params


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        fx.TrainState.create(nn.ReLU(), fx.optim.sgd(0.1))
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fx.TrainState.create(model, fx.optim.sgd(0.1))
    with pytest.raises(TypeError, match="nn.Module"):
        fx.TrainState.create(lambda x: x, fx.optim.sgd(0.1))


def test_step_updates_batchnorm_buffers_and_never_mutates_the_old_state():
    state = fx.TrainState.create(convnet(), fx.optim.adam(1e-2))
    before = _snapshot(state)
    step = fx.make_train_step(xent)
    new, _ = step(state, classification_batch(image=True))
    assert _unchanged(state, before)
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    assert not torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])
    assert int(new.step) == 1


def test_apply_does_not_touch_state_buffers_in_train_mode():
    state = fx.TrainState.create(convnet(), fx.optim.adam(1e-2))
    before = _snapshot(state)
    state.module.train()
    state.apply(state.params, classification_batch(image=True)[0])
    assert _unchanged(state, before)


def _run(seed, steps, state=None):
    state = state or fx.TrainState.create(mlp(dropout=0.5), fx.optim.adam(1e-2), seed=seed)
    step = fx.make_train_step(xent)
    for i in range(steps):
        state, _ = step(state, classification_batch(seed=i))
    return state


def test_dropout_is_a_function_of_seed_and_step():
    assert fx.tree_digest(_run(0, 6)) == fx.tree_digest(_run(0, 6))
    assert fx.tree_digest(_run(0, 6)) != fx.tree_digest(_run(1, 6))


def test_resume_from_leaves_is_identical_to_uninterrupted():
    full = _run(0, 8)
    half = _run(0, 4)
    leaves, spec = pytree.tree_flatten(half)
    rebuilt = pytree.tree_unflatten([t if t is None else t.clone() for t in leaves], spec)
    steps = fx.make_train_step(xent)
    for i in range(4, 8):
        rebuilt, _ = steps(rebuilt, classification_batch(seed=i))
    assert fx.tree_digest(rebuilt) == fx.tree_digest(full)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.sampled_from(["sgd", "adamw", "lion"]))
def test_step_keeps_the_tree_structure(hidden, opt):
    tx = {"sgd": fx.optim.sgd(0.1, momentum=0.9), "adamw": fx.optim.adamw(1e-3),
          "lion": fx.optim.lion(1e-3)}[opt]
    state = fx.TrainState.create(mlp((8, *hidden, 4)), tx)
    new, metrics = fx.make_train_step(xent)(state, classification_batch())
    assert pytree.tree_structure(new) == pytree.tree_structure(state)
    assert all(v.ndim == 0 for v in metrics.values())


def test_apply_gradients_rejects_gradients_of_another_tree():
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    grads = {k: torch.zeros_like(v) for k, v in state.params.items()}
    grads["extra"] = grads.pop("0.weight")
    with pytest.raises(ValueError, match=r"missing: \['0.weight'\]"):
        state.apply_gradients(grads)


def test_optimizer_state_from_another_model_is_a_clear_error():
    state = fx.TrainState.create(mlp((8, 16, 4)), fx.optim.adam(0.1))
    other = fx.TrainState.create(mlp((8, 32, 4)), fx.optim.adam(0.1))
    bad = state.replace(opt_state=other.opt_state)
    with pytest.raises(ValueError, match="shape of"):
        fx.make_train_step(xent)(bad, classification_batch())


def test_no_empty_containers_in_a_fresh_state():
    """Regression guard for DESIGN principle 5: absent parts are None, never {} or ()."""
    state = fx.TrainState.create(mlp(), fx.optim.adamw(1e-3))

    def walk(node):
        if isinstance(node, dict | list | tuple):
            assert len(node) > 0, "empty container in TrainState"
            for v in (node.values() if isinstance(node, dict) else node):
                walk(v)

    walk(pytree.tree_flatten(state)[0])
    walk(state.opt_state)
    assert state.buffers is None and state.callbacks is None and state.data is None


def test_empty_dict_next_to_0d_tensors_still_compiles():
    """The torch 2.13 Dynamo pitfall of DESIGN principle 5 must not break a compiled step."""
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1)).replace(callbacks={}, data={})
    step = torch.compile(fx.make_train_step(xent), fullgraph=True, backend="eager")
    new, _ = step(state, classification_batch())
    assert int(new.step) == 1 and new.callbacks == {}


class TiedHead(nn.Module):
    """An embedding and a head that share one weight (as GPT-2's do)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids):
        return self.head(self.tokens(ids))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_apply_binds_tied_weights_to_the_one_tensor_given(compiled):
    torch.manual_seed(0)
    model = TiedHead()
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    assert list(state.params) == ["tokens.weight"]  # one tensor, one name
    ids = torch.tensor([[0, 3, 4]])
    apply = torch.compile(state.apply, fullgraph=True, backend="eager") if compiled \
        else state.apply
    torch.testing.assert_close(apply(state.params, ids), model(ids), rtol=0, atol=0)
    w = torch.randn(5, 3)
    expected = (w[ids]) @ w.T  # both uses read the one weight given, under either name
    torch.testing.assert_close(apply({"tokens.weight": w}, ids), expected)
    torch.testing.assert_close(apply({"head.weight": w}, ids), expected)
    torch.testing.assert_close(apply({"tokens.weight": w, "head.weight": w}, ids), expected)
    # (compiled, Dynamo wraps the ValueError; fx.fit gives it back as itself)
    with pytest.raises(Exception, match=r"ValueError: state.apply got different tensors for "
                       r"\['head.weight', 'tokens.weight'\], which the module ties") if compiled \
            else pytest.raises(ValueError, match=r"different tensors for \['head.weight', "
                               r"'tokens.weight'\], which the module ties"):
        apply({"tokens.weight": w, "head.weight": w.clone()}, ids)


def test_one_compiled_step_serves_states_of_two_models_of_one_architecture():
    """A fresh model of the same architecture (tied weights included) reuses the compiled step:
    nothing in it is guarded on the module object."""
    def loss_fn(state, params, ids):
        return state.apply(params, ids).logsumexp(-1).mean()

    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend="eager")
    ids = torch.tensor([[0, 3, 4]])
    first, second = (fx.TrainState.create(TiedHead(), fx.optim.sgd(0.1)) for _ in range(2))
    step(first, ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(second, ids)
