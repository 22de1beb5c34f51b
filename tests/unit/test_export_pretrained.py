"""``fx.export_pretrained`` and ``fxtrain export``: a checkpoint (sharded over 2 gloo ranks, or
not) out to a Hugging Face folder that ``from_pretrained`` loads, with the trained module's
logits, written one tensor at a time."""

import json

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain as fx
from fxtrain import cli
from helpers_export_pretrained import loaded, logits, trained, transformers


def test_a_checkpoint_exports_to_a_folder_from_pretrained_loads_with_the_trained_logits(
        tmp_path):
    state, ckpt = trained(tmp_path)
    out = fx.export_pretrained(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = loaded(out)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again on load
    assert torch.equal(logits(model), logits(fx.trained_module(state).eval()))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_embd"] == 16


def test_the_command_line_splits_the_weights_into_files_with_an_index(tmp_path, capsys):
    state, ckpt = trained(tmp_path)
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--step", "2",
                     "--max-shard-size", "0.000004"]) == 0  # 4 kB files
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in names and len(names) > 4
    assert "wrote" in capsys.readouterr().out
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state.params) | {
        n for n in state.buffers or {} if n in fx.trained_module(state).state_dict()}
    assert torch.equal(logits(loaded(tmp_path / "hf")), logits(fx.trained_module(state).eval()))


def test_tensors_are_read_one_at_a_time_and_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    _, ckpt = trained(tmp_path, steps=1)
    from fxtrain.checkpoint import store
    asked, read = [], store.read_arrays

    def spy(path, keys, saved):
        asked.append(list(keys))
        return read(path, keys, saved)

    monkeypatch.setattr(store, "read_arrays", spy)
    fx.export_pretrained(ckpt, tmp_path / "hf")
    assert asked and all(len(keys) == 1 for keys in asked)

    def failing(path, keys, saved):  # a disk failing midway: nothing left behind
        if len(asked) > 3:
            raise OSError(5, "Input/output error")
        return spy(path, keys, saved)

    asked.clear()
    monkeypatch.setattr(store, "read_arrays", failing)
    with pytest.raises(OSError, match="Input/output error"):
        fx.export_pretrained(ckpt, tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_bad_exports_are_refused_and_nothing_is_written_or_lost(tmp_path, capsys):
    _, ckpt = trained(tmp_path, steps=1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder; nothing was written"):
        fx.export_pretrained(ckpt, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 9"):
        fx.export_pretrained(ckpt, tmp_path / "a", step=9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fx.export_pretrained(tmp_path / "nowhere", tmp_path / "b")
    plain = fx.checkpoint.save(tmp_path / "plain", fx.TrainState.create(
        torch.nn.Linear(2, 2), fx.optim.sgd(0.1)))
    with pytest.raises(ValueError, match="records no Hugging Face config.*pass config="):
        fx.export_pretrained(plain, tmp_path / "c")
    assert cli.main(["export", str(plain), str(tmp_path / "d")]) == 1
    assert "records no Hugging Face config" in capsys.readouterr().err
    # a config given for a model of one's own: its weights under its names
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mine"}))
    out = fx.export_pretrained(plain, tmp_path / "e", config=tmp_path)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["bias", "weight"]
    # a damaged description: refused, and no folder left behind
    description = ckpt / "1" / "fxtrain" / "metadata"
    data = bytearray(description.read_bytes())
    data[len(data) // 2] ^= 0x01
    description.write_bytes(bytes(data))
    with pytest.raises(fx.checkpoint.DamagedCheckpointError):
        fx.export_pretrained(ckpt, tmp_path / "f")
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or p.name == "f"]


def _tree(root):
    """Every path under ``root`` with the bytes of each file (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf"])
def test_a_max_shard_size_that_is_no_size_is_refused_in_one_line(tmp_path, capsys, size):
    _, ckpt = trained(tmp_path, steps=1)
    before = _tree(tmp_path)
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--max-shard-size", size]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxtrain export: error: --max-shard-size "
                                                   "must be a positive number of GB"), err
    assert size in err and _tree(tmp_path) == before


def test_a_config_of_another_model_is_refused_before_anything_is_written(tmp_path, capsys):
    """--config of another width (or another model) wrote a folder with exit 0 that only
    from_pretrained found wrong: now checked against the checkpoint's names and shapes."""
    _, ckpt = trained(tmp_path, steps=1)
    other = dist_worker.tiny_gpt2().config
    other.n_embd = 32
    other.save_pretrained(tmp_path / "wide")
    bert = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, vocab_size=40,
                                   architectures=["BertForMaskedLM"])
    bert.save_pretrained(tmp_path / "bert")
    before = _tree(tmp_path)
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--config",
                     str(tmp_path / "wide")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxtrain export: error: --config "), err
    assert "does not describe the checkpoint's model" in err
    assert "transformer.h.0.attn.c_attn.bias: checkpoint (48,), config (96,); and 27 more" in err
    assert "pass the config the model was trained with" in err
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--config",
                     str(tmp_path / "bert")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the config's model" in err, err
    assert _tree(tmp_path) == before
    same = dist_worker.tiny_gpt2().config
    same.save_pretrained(tmp_path / "same")
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--config",
                     str(tmp_path / "same")]) == 0
    loaded(tmp_path / "hf")
