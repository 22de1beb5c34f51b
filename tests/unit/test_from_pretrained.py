"""fx.from_pretrained in one process: a folder loaded into the state the whole-model path gives
(transformers' from_pretrained, then TrainState.create), the slice arithmetic against
torch.chunk's split, and every bad folder refused by name before a tensor is read (the ranks:
tests/ranks/test_from_pretrained_ranks.py)."""

import json
import os
import shutil

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings, strategies as st

import fxtrain as fx
import pretrained_worker
from fxtrain.checkpoint import DamagedCheckpointError
from fxtrain.apps._pretrained import ConfigMismatchError
from fxtrain.distributed._slices import local_box
from helpers import extra
from helpers_export_pretrained import trained

transformers = extra("transformers")
# the meta skeleton (fxtrain._torch.meta_init) and DTensor's local split on every torch; the
# fxtrain train runs below are slow, so the other torches' legs skip them
pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    pretrained_worker.save_models(out)
    return out


def _whole(folder, tx, **kwargs):
    cls = getattr(transformers, json.loads((folder / "config.json").read_text())
                  ["architectures"][0])
    return fx.TrainState.create(cls.from_pretrained(folder, **kwargs), tx, seed=2)


def _equal(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        if x is None:
            assert y is None
            continue
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)


@pytest.mark.parametrize("model", ["llama", "llama_tied", "gpt2"])
def test_alone_it_is_the_whole_model_path(folders, model):
    """Parameters, buffers (the rotary tables __init__ computes), optimizer state, step and
    key bit for bit; the tied names and the layout as TrainState.create finds them; the state
    trains."""
    tx = fx.optim.adamw(1e-2)
    whole = _whole(folders / model, tx)
    loaded = fx.from_pretrained(folders / model, tx, seed=2)
    for part in ("params", "buffers", "opt_state", "step", "rng"):
        _equal(getattr(whole, part), getattr(loaded, part))
    assert loaded.layout.tied == whole.layout.tied
    assert not any(p.is_meta for p in loaded.params.values())
    ids = torch.arange(24).reshape(2, 12) % 37
    step = fx.make_train_step(pretrained_worker._loss, donate=False)
    _equal(step(whole, ids)[0].params, step(loaded, ids)[0].params)


def test_a_dtype_given_casts_the_floating_weights_as_transformers_does(folders):
    """dtype=torch.bfloat16 on a float32 folder: the parameters those of
    from_pretrained(dtype=torch.bfloat16); the rotary tables stay float32 as there."""
    tx = fx.optim.sgd(0.1)
    whole = _whole(folders / "llama", tx, dtype=torch.bfloat16)
    loaded = fx.from_pretrained(folders / "llama", tx, seed=2, dtype=torch.bfloat16)
    _equal(whole.params, loaded.params)
    _equal(whole.buffers, loaded.buffers)
    assert loaded.params["lm_head.weight"].dtype == torch.bfloat16


def test_an_exported_checkpoint_loads_back(tmp_path):
    """The round trip: a trained state's checkpoint, exported to a folder, loads into the
    state's parameters bit for bit."""
    state, ckpt = trained(tmp_path)
    folder = fx.export_pretrained(ckpt, tmp_path / "hf")
    loaded = fx.from_pretrained(folder, fx.optim.adamw(1e-2))
    _equal(state.params, loaded.params)


@st.composite
def _layouts(draw):
    from torch.distributed.tensor import Replicate, Shard
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0, 11), min_size=ndim, max_size=ndim))
    mesh = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    placements = [draw(st.sampled_from([Replicate(), *[Shard(d) for d in range(ndim)]]))
                  for _ in mesh]
    coordinate = [draw(st.integers(0, n - 1)) for n in mesh]
    return shape, mesh, coordinate, placements


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_a_ranks_box_is_what_torch_chunk_gives_it(layout):
    """Any shape (empty dimensions, fewer rows than ranks), 1-D and 2-D meshes, every mix of
    Shard and Replicate, a dimension split twice: the box is the part that splitting the
    whole tensor with torch.chunk, mesh dimension by mesh dimension, leaves this rank (what
    distribute_tensor's local split does; the ranks' tests check it against torch itself)."""
    from torch.distributed.tensor import Shard
    shape, mesh, coordinate, placements = layout
    whole = torch.arange(max(1, int(torch.tensor(shape).prod()))).reshape(-1)[
        :int(torch.tensor(shape).prod())].reshape(shape)
    part = whole
    for parts, index, placement in zip(mesh, coordinate, placements):
        if isinstance(placement, Shard):
            chunks = part.chunk(parts, dim=placement.dim) if part.shape[placement.dim] else ()
            empty = list(part.shape)
            empty[placement.dim] = 0
            part = chunks[index] if index < len(chunks) else part.new_empty(empty)
    box = local_box(shape, mesh, coordinate, placements)
    assert torch.equal(whole[box], part)


def test_a_partial_placement_is_refused():
    from torch.distributed.tensor import Partial
    with pytest.raises(ValueError, match="Partial.*Shard and Replicate"):
        local_box((4,), (2,), (0,), [Partial()])


# -- bad folders: each one error naming it, raised before any tensor is read -----------------

@pytest.fixture
def copy(folders, tmp_path, monkeypatch):
    """A copy of a saved model's folder to damage; no tensor may be read from it (a read
    fails the test), so each refusal is shown to come first."""
    def made(model="llama"):
        out = tmp_path / model
        shutil.copytree(folders / model, out)
        return out

    import safetensors

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read before the folder was checked")

    monkeypatch.setattr(safetensors, "safe_open", no_read)
    return made


def _files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def _tensors(folder, remove=False):
    """Every tensor of a saved folder, by name; ``remove``: its files and index deleted."""
    import safetensors.torch as st_torch
    tensors = {}
    for file in _files(folder):
        tensors.update(st_torch.load_file(file))
        if remove:
            file.unlink()
    if remove:
        (folder / "model.safetensors.index.json").unlink()
    return tensors


def _load(folder):
    return fx.from_pretrained(folder, fx.optim.sgd(0.1))


def test_a_file_cut_short_by_one_byte(copy):
    folder = copy()
    file = _files(folder)[2]
    os.truncate(file, file.stat().st_size - 1)
    with pytest.raises(DamagedCheckpointError, match=f"{file.name}.*cut short"):
        _load(folder)


def test_a_header_cut_short(copy):
    folder = copy()
    file = _files(folder)[0]
    os.truncate(file, 20)
    with pytest.raises(DamagedCheckpointError, match=f"{file.name}.*cut short"):
        _load(folder)


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 48}, r"mlp\.\w+_proj\.weight: file \(\d+, \d+\), config .*more.*"
                                r"nothing was loaded"),
    ({"num_hidden_layers": 3}, r"model\.layers\.2\.\S+: in the config's model, not in the "
                               r"file"),
], ids=["wider", "deeper"])
def test_a_config_that_does_not_match_the_weights(copy, change, message):
    folder = copy()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigMismatchError, match=message):
        _load(folder)


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_missing_index_entry(copy):
    folder = copy()
    index = _index(folder)
    name = "model.layers.1.mlp.down_proj.weight"
    file = index["weight_map"].pop(name)
    _write_index(folder, index)
    with pytest.raises(DamagedCheckpointError, match=f"{file}.*holds {name}, which the index "
                                                     "does not list"):
        _load(folder)


def test_an_index_naming_a_file_not_there(copy):
    folder = copy()
    file = _files(folder)[1]
    file.unlink()
    with pytest.raises(DamagedCheckpointError, match=f"to {file.name}, which is not in the "
                                                     "folder"):
        _load(folder)


def test_an_index_entry_its_file_does_not_hold(copy):
    folder = copy()
    index = _index(folder)
    name = "model.norm.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    _write_index(folder, index)
    with pytest.raises(DamagedCheckpointError, match=name):
        _load(folder)


def test_a_tensor_the_model_does_not_have(copy, tmp_path):
    """An extra tensor in a one-file folder: refused by name (transformers would drop it)."""
    import safetensors.torch as st_torch
    folder = copy("gpt2")
    tensors = _tensors(folder, remove=True)
    tensors["transformer.extra.weight"] = torch.zeros(3)
    st_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigMismatchError, match="transformer.extra.weight: not in the "
                                                  "config's model"):
        _load(folder)


def test_a_weight_of_another_kind(copy):
    import safetensors.torch as st_torch
    folder = copy("gpt2")
    tensors = _tensors(folder, remove=True)
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"].to(torch.int32)
    st_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigMismatchError, match="transformer.ln_f.bias: the file's "
                                                  "torch.int32, the model's torch.float32"):
        _load(folder)


def test_no_config_no_folder_no_weights_no_architecture(copy, tmp_path):
    folder = copy()
    with pytest.raises(FileNotFoundError, match="no folder at"):
        _load(tmp_path / "absent")
    (folder / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _load(folder)
    config = json.loads((tmp_path / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchLM"]}))
    with pytest.raises(ValueError, match="has no model 'NoSuchLM'"):
        _load(folder)
    for file in _files(folder):
        file.unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors are read"):
        _load(folder)


def test_a_layout_alone_is_refused(folders):
    with pytest.raises(ValueError, match="this process is alone"):
        fx.from_pretrained(folders / "llama", fx.optim.sgd(0.1), tp_plan="auto")


# -- fxtrain train's pretrained key -----------------------------------------------------------

_FACTORIES = '''
import torch, transformers
import fxtrain as fx

def tokens(batch_size=4):
    ids = torch.randint(0, 37, (16, 12), generator=torch.Generator().manual_seed(3))
    return fx.data.Batches(ids, batch_size, seed=0)

def whole(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder)
'''


def _config(tmp_path, name, **values):
    return {"data": "factories:tokens", "loss": "causal_lm", "max_steps": 3, "compile": False,
            "optim": {"name": "adamw", "lr": 1e-2, "schedule": "constant"},
            "workdir": str(tmp_path / name), "checkpoint_every": None, "progress": False,
            **values}


@pytest.mark.slow
def test_fxtrain_train_fine_tunes_a_folder_as_the_whole_model_path(folders, tmp_path,
                                                                     monkeypatch):
    """``pretrained: FOLDER`` trains the state a model factory returning transformers'
    from_pretrained trains, bit for bit; the config it saves names the folder, and a resume
    from it goes on."""
    (tmp_path / "factories.py").write_text(_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = str(folders / "llama_tied")
    loaded = fx.train(_config(tmp_path, "loaded", pretrained=folder))
    whole = fx.train(_config(tmp_path, "whole", model="factories:whole",
                             model_args={"folder": folder}))
    assert fx.tree_digest(loaded.params) == fx.tree_digest(whole.params)
    assert int(loaded.step) == 3
    assert f"pretrained: {folder}" in (tmp_path / "loaded" / "config.yaml").read_text()
    resumed = fx.train(_config(tmp_path, "loaded", pretrained=folder, max_steps=5,
                               resume=True, allow_changes="max_steps"))
    assert int(resumed.step) == 5


@pytest.mark.slow
@pytest.mark.parametrize("values,message", [
    ({}, "model: give the model factory's import path, or pretrained"),
    ({"model": "factories:whole", "pretrained": "x"}, "model and pretrained: both given"),
    ({"pretrained": "PATH", "pretrained_args": {"unit": "whole"}},
     "pretrained_args: 'unit' is none of units"),
    ({"pretrained": "PATH", "model_args": {"folder": "x"}}, "model_args: the model factory's"),
    ({"pretrained": "PATH", "precision": "fp8"}, "precision: fp8 converts"),
    ({"pretrained": "PATH", "pretrained_args": {"dtype": "bfloat17"}},
     "pretrained_args.dtype: 'bfloat17' is no torch dtype"),
    ({"pretrained": "NOWHERE"}, "pretrained: fx.from_pretrained: no folder at"),
])
def test_fxtrain_train_refuses_a_bad_pretrained_config_naming_the_key(folders, tmp_path,
                                                                       monkeypatch, values,
                                                                       message):
    from fxtrain.apps._configured import ConfigError
    (tmp_path / "factories.py").write_text(_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    values = {k: str(folders / "llama") if v == "PATH" else
              str(tmp_path / "absent") if v == "NOWHERE" else v for k, v in values.items()}
    with pytest.raises(ConfigError, match=message):
        fx.train(_config(tmp_path, "bad", **values))
    assert not (tmp_path / "bad" / "config.yaml").exists()


# -- folders transformers loads as it matches them ---------------------------------------------

def _single(folder, tensors, config):
    import safetensors.torch as st_torch
    folder.mkdir()
    st_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bf16_files_without_a_config_dtype_load_in_bf16(folders, tmp_path):
    """transformers' "auto": no dtype in the config, the files' (here bfloat16)."""
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors(folders / "llama").items()}
    config = json.loads((folders / "llama" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    folder = _single(tmp_path / "bf16", tensors, config)
    tx = fx.optim.sgd(0.1)
    loaded = fx.from_pretrained(folder, tx, seed=2)
    _equal(_whole(folder, tx).params, loaded.params)
    assert loaded.params["lm_head.weight"].dtype == torch.bfloat16


def test_a_base_models_save_loads_into_its_task_model(tmp_path):
    """GPT-2 as the hub holds it: the base model's names (h.0..., no head), loaded as
    GPT2LMHeadModel, whose names carry the prefix "transformer." and whose head is tied."""
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=37,
                                     n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "base")
    tx = fx.optim.sgd(0.1)
    loaded = fx.from_pretrained(tmp_path / "base", tx, seed=2,
                                model_class=transformers.GPT2LMHeadModel)
    whole = fx.TrainState.create(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                 tx, seed=2)
    _equal(whole.params, loaded.params)


def test_names_transformers_ignores_are_ignored(folders, tmp_path):
    """An old checkpoint's per-layer rotary tables: transformers drops them, so does this."""
    tensors = _tensors(folders / "llama")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    config = json.loads((folders / "llama" / "config.json").read_text())
    folder = _single(tmp_path / "old", tensors, config)
    tx = fx.optim.sgd(0.1)
    _equal(_whole(folder, tx).params, fx.from_pretrained(folder, tx, seed=2).params)


def test_a_tied_config_over_two_different_tensors_is_refused(folders, tmp_path):
    tensors = _tensors(folders / "llama")
    config = json.loads((folders / "llama" / "config.json").read_text())
    folder = _single(tmp_path / "untied", tensors, {**config, "tie_word_embeddings": True})
    with pytest.raises(ConfigMismatchError, match="ties .*holds different tensors for "
                                                  "model.embed_tokens.weight and lm_head.weight"):
        _load(folder)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    same = _single(tmp_path / "same", tensors, {**config, "tie_word_embeddings": True})
    assert _load(same).layout.tied == (("model.embed_tokens.weight", "lm_head.weight"),)


def test_a_header_whose_tensors_overlap_is_damage(copy):
    """Two tensors sharing bytes: refused by the header check, before safetensors maps it."""
    import struct as st
    folder = copy("gpt2")
    file = _files(folder)[0]
    raw = file.read_bytes()
    (length,) = st.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    names = [n for n in header if n != "__metadata__"]
    a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = [header[b]["data_offsets"][0] - 4,
                                 header[b]["data_offsets"][1] - 4]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(st.pack("<Q", len(encoded)) + encoded + raw[8 + length:])
    with pytest.raises(DamagedCheckpointError, match=f"{b} bytes .*overlapping {a}"):
        _load(folder)


def test_a_model_that_keeps_layers_in_float32_is_refused_in_half(tmp_path):
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="keeps .*wo.* in float32"):
        fx.from_pretrained(tmp_path / "t5", fx.optim.sgd(0.1), dtype=torch.float16)


@pytest.mark.slow
def test_a_relative_pretrained_folder_is_the_config_files_neighbour(folders, tmp_path,
                                                                   monkeypatch):
    """``pretrained: model`` in a YAML config names the folder beside the config, wherever
    the command runs from; config.yaml keeps it absolute, so a resume from elsewhere finds it."""
    import yaml
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(folders / "llama", project / "model")
    (project / "factories.py").write_text(_FACTORIES)
    values = _config(tmp_path, "run", pretrained="model", data="./factories.py:tokens",
                     max_steps=2)
    (project / "run.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    state = fx.train(str(project / "run.yaml"))
    assert int(state.step) == 2
    assert f"pretrained: {project / 'model'}" in (tmp_path / "run" / "config.yaml").read_text()


def test_the_state_owns_its_memory_a_file_rewritten_later_changes_nothing(folders, tmp_path):
    """safetensors hands back views of its mapping of the file; the state copies them, so a
    folder written over (or cut) after the load leaves the state as it was loaded."""
    folder = tmp_path / "llama"
    shutil.copytree(folders / "llama", folder)
    loaded = fx.from_pretrained(folder, fx.optim.sgd(0.1))
    before = {k: v.clone() for k, v in loaded.params.items()}
    for file in _files(folder):  # the same bytes' places, zeroed in place
        raw = file.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        with open(file, "r+b") as f:
            f.seek(8 + length)
            f.write(bytes(len(raw) - 8 - length))
    _equal(before, loaded.params)


def test_under_nccl_the_slices_go_to_this_process_device(monkeypatch):
    """The branch a GPU job takes (a mesh on CUDA): the read slices go to the current device,
    forced here with a stand-in mesh and device index."""
    from types import SimpleNamespace
    from fxtrain.apps import _from_pretrained
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 3)
    cuda = SimpleNamespace(layout=SimpleNamespace(mesh=SimpleNamespace(device_type="cuda")))
    assert _from_pretrained._device(cuda) == torch.device("cuda", 3)
    cpu = SimpleNamespace(layout=SimpleNamespace(mesh=SimpleNamespace(device_type="cpu")))
    assert _from_pretrained._device(cpu) == torch.device("cpu")
