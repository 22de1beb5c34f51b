"""The trained model out of a state: ``fx.trained_module`` and safetensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
from fxtrain.donation import DonatedError
from helpers import classification_batch, convnet, extra, mlp, xent


def _trained(model, steps=3, batch=None):
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2))
    step = fx.make_train_step(xent)
    batch = batch or classification_batch()
    for _ in range(steps):
        state, _ = step(state, batch)
    return state, batch


def test_trained_module_runs_like_the_state_with_the_trained_weights():
    model = convnet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    state, (x, _) = _trained(model, batch=classification_batch(image=True))
    out = fx.trained_module(state)
    assert isinstance(out, nn.Module) and type(out) is type(model)
    for name, value in out.state_dict().items():
        assert torch.equal(value, {**state.params, **state.buffers}[name]), name
        assert value.device.type == "cpu"
    assert not torch.equal(out.state_dict()["0.weight"], initial["0.weight"])
    out.eval()
    with torch.no_grad():
        expected = fx.make_eval_step(lambda s, p, b: {"y": s.apply(p, b)})(state, x)["y"]
        torch.testing.assert_close(out(x), expected)
    assert all(p.requires_grad for p in out.parameters())
    # a copy: training on changes neither
    out.state_dict()["0.weight"].add_(1.0)
    assert not torch.equal(out.state_dict()["0.weight"], state.params["0.weight"])


def test_trained_module_keeps_tied_weights_tied_and_frozen_parameters_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, ids):
            return self.head(self.frozen(self.embed(ids)))

    torch.manual_seed(0)
    state = fx.TrainState.create(Tied(), fx.optim.sgd(0.5))
    ids = torch.randint(0, 10, (8,))
    step = fx.make_train_step(lambda s, p, b: F.cross_entropy(s.apply(p, b), b))
    state, _ = step(state, ids)
    out = fx.trained_module(state)
    assert out.head.weight is out.embed.weight
    assert torch.equal(out.embed.weight, state.params["embed.weight"])
    assert not out.frozen.weight.requires_grad and out.embed.weight.requires_grad
    torch.testing.assert_close(out(ids), state.apply(state.params, ids))


def test_the_skeleton_points_to_trained_module_and_a_donated_state_is_refused():
    state, (x, _) = _trained(mlp())
    with pytest.raises(RuntimeError, match="fx.trained_module"):
        state.module(x)
    out = fx.trained_module(state)  # its copy of the guard removed: on the meta device it
    assert out.to("meta")(x.to("meta")).is_meta  # runs as any module does
    with pytest.raises(RuntimeError, match="fx.trained_module"):
        state.module(x)  # the state's own skeleton keeps its guard
    fx.donation.mark(state)
    with pytest.raises(DonatedError):
        fx.trained_module(state)


def test_safetensors_round_trip_into_a_state_and_into_the_model(tmp_path):
    st = extra("safetensors.torch")
    state, _ = _trained(convnet(), batch=classification_batch(image=True))
    path = fx.save_safetensors(state, tmp_path / "model.safetensors", metadata={"run": "a"})
    fresh = fx.TrainState.create(convnet(seed=1), fx.optim.adamw(1e-2))
    loaded = fx.load_safetensors(path, like=fresh)
    assert fx.tree_digest(loaded.params) == fx.tree_digest(state.params)
    assert fx.tree_digest(loaded.buffers) == fx.tree_digest(state.buffers)
    assert fx.tree_digest(loaded.opt_state) == fx.tree_digest(fresh.opt_state)  # weights only
    model = convnet(seed=2)
    model.load_state_dict(st.load_file(str(path)))
    assert all(torch.equal(v, fx.trained_module(state).state_dict()[k])
               for k, v in model.state_dict().items())
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["fxtrain_step"] == "3" and f.metadata()["run"] == "a"


def test_safetensors_errors_name_the_problem_and_keep_what_was_saved(tmp_path):
    state, _ = _trained(mlp())
    path = fx.save_safetensors(state, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fx.save_safetensors(state, tmp_path / "nowhere" / "m.safetensors")
    with pytest.raises(FileNotFoundError, match="no file"):
        fx.load_safetensors(tmp_path / "missing.safetensors", like=state)
    other = fx.TrainState.create(mlp((8, 32, 4)), fx.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"does not hold this state's weights.*0.weight: \(16, 8\)"):
        fx.load_safetensors(path, like=other)
    renamed = fx.TrainState.create(nn.Sequential(nn.Identity(), *mlp()), fx.optim.sgd(0.1))
    with pytest.raises(ValueError, match="missing.*not in the state"):
        fx.load_safetensors(path, like=renamed)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no partial file left


def test_a_transformers_model_comes_out_ready_to_generate_and_save(tmp_path):
    transformers = extra("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16, resid_pdrop=0.1, attn_pdrop=0.1)
    state = fx.TrainState.create(transformers.GPT2LMHeadModel(config), fx.optim.adamw(1e-2))
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(state, params, batch):
        return state.apply(params, batch, labels=batch, use_cache=False).loss

    step = fx.make_train_step(loss_fn)
    for _ in range(3):
        state, _ = step(state, ids)
    model = fx.trained_module(state).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, state.params["transformer.wte.weight"])
    out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    model.save_pretrained(tmp_path / "gpt")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt")
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_the_trained_module_exports_with_torch_export():
    state, (x, _) = _trained(convnet(), batch=classification_batch(image=True))
    model = fx.trained_module(state).eval()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
