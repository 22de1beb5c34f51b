"""Issue 78, item 3: peft's LoRA on a sharded state, on a one-rank group: the frozen base
weights sharded as parameters (no optimizer state, never copied per step), the adapter trained
with an unsharded run's bits, and peft's own load of the saved adapter gives the same logits."""

import dataclasses

import pytest
import torch

import fxtrain as fx
from helpers import extra, graph_count
from helpers_distributed import UNITS_COMPILED

peft = extra("peft")
transformers = extra("transformers")

IDS = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))


def _base():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


def _lora(targets=("c_attn",)):
    return peft.get_peft_model(_base(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, fan_in_fan_out=True))


def _loss(s, p, ids):
    logits = s.apply(p, ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32),
                                             ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("compiled,units", [
    (False, "whole"), (False, "auto"), (True, "whole"),
    pytest.param(True, "auto", marks=UNITS_COMPILED)],
    ids=["eager-whole", "eager-auto", "compiled-whole", "compiled-auto"])
def test_lora_on_a_sharded_state_trains_as_unsharded_and_peft_loads_it(one_rank, units,
                                                                       compiled, tmp_path):
    step = fx.make_train_step(_loss)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    plain = fx.TrainState.create(_lora(), fx.optim.adamw(3e-2))
    sharded = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units=units)
    frozen = sharded.layout.frozen
    assert frozen and all(fx.distributed.is_dtensor(sharded.buffers[k]) for k in frozen)
    assert all("lora_" in k for k in sharded.params)
    given = {k: sharded.buffers[k] for k in frozen}
    for _ in range(3):
        plain, plain_metrics = step(plain, IDS)
        sharded, metrics = step(sharded, IDS)
        assert torch.equal(metrics["loss"], plain_metrics["loss"])
    assert all(sharded.buffers[k] is given[k] for k in frozen)  # never copied nor written
    assert not compiled or graph_count() == 2  # one per state, no recompile over the steps
    whole = fx.sharding.gathered(sharded.params)
    assert all(torch.equal(whole[k], plain.params[k]) for k in plain.params)
    trained = fx.trained_module(sharded)
    trained.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, trained.eval()(IDS).logits)


def test_a_unit_sends_back_only_its_adapters_gradients(one_rank, monkeypatch):
    """An eager unit reduce-scatters the gradients of its trained parameters only: its frozen
    base weights send nothing back (before, zeros of their size), and autograd computes no
    gradient for them (before, each frozen weight's whole gradient, held until the unit's
    backward)."""
    from fxtrain.distributed._unit_buffer import collectives  # what a unit's buffer calls
    from fxtrain.distributed._unit_gather import _Gather
    sent, received = [], []
    scatter, backward = collectives.reduce_scatter_single, _Gather.backward

    def counted(tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return scatter(tensor, *args, **kwargs)

    def seen(ctx, *grads):
        received.append(sum(g is not None for g in grads))
        return backward(ctx, *grads)

    monkeypatch.setattr(collectives, "reduce_scatter_single", counted)
    monkeypatch.setattr(_Gather, "backward", staticmethod(seen))
    state = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units="auto")
    units = state.layout.units
    assert units and any(k.startswith(u + ".") for u in units for k in state.layout.frozen)
    state, _ = fx.make_train_step(_loss)(state, IDS)
    in_units = sum(p.numel() for k, p in state.params.items()
                   if any(k.startswith(u + ".") for u in units))
    assert sent and sum(sent) == in_units
    adapters = sum(1 for k in state.params if any(k.startswith(u + ".") for u in units))
    assert received and sum(received) == adapters


def test_a_sharded_lora_state_resumes_from_its_checkpoint_bit_for_bit(one_rank, tmp_path):
    """The frozen base (sharded, among the buffers) and the adapters' optimizer state go through
    a checkpoint: the restored run's next steps equal the uninterrupted run's."""
    step = fx.make_train_step(_loss)
    state = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units="auto")
    state, _ = step(state, IDS)
    fx.checkpoint.save(tmp_path / "c", state)
    like = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units="auto")
    like = dataclasses.replace(like, buffers={k: torch.zeros_like(v) for k, v in
                                              like.buffers.items()})  # all read back
    back = fx.checkpoint.restore(tmp_path / "c", like=like)
    assert all(fx.distributed.is_dtensor(back.buffers[k]) for k in back.layout.frozen)
    for _ in range(2):
        state, metrics = step(state, IDS)
        back, back_metrics = step(back, IDS)
        assert torch.equal(metrics["loss"], back_metrics["loss"])
    assert fx.tree_digest(back) == fx.tree_digest(state)


@pytest.mark.parametrize("targets,adapter", [(["c_attn"], "lora_A"),
                                              (["wte"], "lora_embedding_A")],
                         ids=["linear", "embedding"])
def test_exporting_a_lora_checkpoint_as_a_model_folder_is_refused_and_writes_nothing(
        tmp_path, targets, adapter):
    """A LoRA state's checkpoint holds peft's names (base_model.model..., lora_A, or
    lora_embedding_A on an embedding): written as a Hugging Face folder, the base model could
    not load it; the export names the adapter and the two ways out, and leaves no folder."""
    state = fx.TrainState.create(_lora(targets), fx.optim.adamw(3e-2))
    fx.checkpoint.save(tmp_path / "c", state)
    with pytest.raises(ValueError, match=rf"holds a peft LoRA model \(base_model\.model\..*"
                                         rf"\.{adapter}\..*fx\.save_adapter"):
        fx.export_pretrained(tmp_path / "c", tmp_path / "hf", config=_base().config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    _base().save_pretrained(path)
    return path


def _config(**kwargs):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                              "lora_dropout": 0.0, "fan_in_fan_out": True, **kwargs})


def test_one_process_loads_lora_trains_it_and_saves_what_peft_loads(folder, tmp_path):
    """fx.from_pretrained(lora=) alone: the base read from the folder and frozen, lora_B zeros
    (the folder's logits), the adapters alone trained; fx.save_adapter's folder loaded by peft
    gives the trained logits; a second save there, or of a model that is no peft model, is
    refused and leaves the files as they were."""
    state = fx.from_pretrained(folder, fx.optim.adamw(3e-2), lora=_config())
    assert state.layout.frozen and all("lora_" in k for k in state.params)
    assert sorted(state.opt_state[0].mu) == sorted(state.params)
    with torch.no_grad():
        assert torch.equal(state.apply(state.params, IDS).logits, _base().eval()(IDS).logits)
    state, _ = fx.make_train_step(_loss)(state, IDS)
    fx.save_adapter(state, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, fx.trained_module(state).eval()(IDS).logits)
    written = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    with pytest.raises(FileExistsError, match="already holds .*adapter_model.safetensors"):
        fx.save_adapter(state, tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == written
    plain = fx.TrainState.create(_base(), fx.optim.adamw(3e-2))
    with pytest.raises(TypeError, match="GPT2LMHeadModel, not a peft model"):
        fx.save_adapter(plain, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("lora,error,match", [
    ({"r": 4}, TypeError, "lora takes a peft.LoraConfig, got dict"),
    (dict(use_dora=True), ValueError, "use_dora=True"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights='pissa'"),
    (dict(modules_to_save=["lm_head"]), ValueError, "modules_to_save=\\['lm_head'\\]"),
    (dict(target_modules=["wte"]), ValueError, "transformer.wte.lora_embedding_A.* not a "
                                               "linear layer's"),
    (dict(bias="all"), ValueError, "bias='all' .*bias='none' trains the adapters alone"),
    (dict(bias="lora_only"), ValueError, "bias='lora_only'"),
], ids=["not a config", "dora", "pissa", "modules_to_save", "embedding", "bias all",
        "bias lora_only"])
def test_lora_configurations_it_cannot_load_are_refused_by_name(folder, lora, error, match):
    config = lora if error is TypeError else _config(**lora)
    with pytest.raises(error, match=match):
        fx.from_pretrained(folder, fx.optim.adamw(3e-2), lora=config)


def test_gaussian_adapters_are_drawn_at_each_layers_own_rank(folder):
    """peft draws a gaussian lora_A with std 1/r of its layer (rank_pattern gives a layer its
    own r): a layer of rank 64 under r=4 is drawn with std 1/64 (before, 1/4)."""
    state = fx.from_pretrained(folder, fx.optim.adamw(3e-2), lora=_config(
        init_lora_weights="gaussian", rank_pattern={"c_attn": 64}))
    drawn = torch.cat([v.flatten() for k, v in state.params.items() if ".lora_A." in k])
    assert drawn.numel() == 2 * 64 * 16  # two blocks' c_attn, rank 64, 16 features in
    assert drawn.std().item() == pytest.approx(1 / 64, rel=0.1)


def test_a_lora_state_with_its_optimizer_offloaded_trains_evaluates_and_predicts(one_rank):
    """offload='optimizer' on a sharded LoRA state: the adapters alone have moments; the steps,
    evaluate and predict give the bits of the state without the offload."""
    step = fx.make_train_step(_loss)
    plain = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units="auto")
    offloaded = fx.shard(fx.TrainState.create(_lora(), fx.optim.adamw(3e-2)), units="auto",
                         offload="optimizer")
    assert sorted(offloaded.opt_state[0].mu) == sorted(offloaded.params)  # adapters only
    for _ in range(2):
        plain, _ = step(plain, IDS)
        offloaded, _ = step(offloaded, IDS)
    assert offloaded.layout.offload == "optimizer"  # where the bytes go: tests/unit/test_offload
    assert all(torch.equal(a.to_local(), b.to_local()) for a, b in
               zip(offloaded.params.values(), plain.params.values()))
    evaluated = [fx.evaluate(fx.make_eval_step(_loss), s, [IDS, IDS.flip(0)])
                 for s in (offloaded, plain)]
    assert torch.equal(evaluated[0]["loss"], evaluated[1]["loss"])
    predicted = [fx.predict(lambda s, x: s.apply(s.params, x).logits, s, [IDS])
                 for s in (offloaded, plain)]
    assert torch.equal(*predicted)


def test_lora_per_block_in_bfloat16_keeps_float32_masters_and_base(one_rank):
    """param_dtype=bfloat16 per block: the units gather the base and the adapters in bfloat16
    for the forward and backward; the adapters' masters and the frozen base stay float32, and
    the run stays within bfloat16's rounding of the float32 one. SGD, so that a difference in
    a gradient moves its parameter by lr times it (AdamW's normalized update turns a tiny
    gradient's rounding into a step of lr): gradients of order 0.1 with bfloat16's relative
    rounding 2**-8, over 3 steps of lr 0.5, move a parameter by about 6e-4; bounded at 2e-3."""
    step = fx.make_train_step(_loss)
    plain = fx.TrainState.create(_lora(), fx.optim.sgd(0.5))
    low = fx.shard(fx.TrainState.create(_lora(), fx.optim.sgd(0.5)), units="auto",
                   param_dtype=torch.bfloat16)
    for _ in range(3):
        plain, plain_metrics = step(plain, IDS)
        low, metrics = step(low, IDS)
        torch.testing.assert_close(metrics["loss"], plain_metrics["loss"], rtol=1e-2, atol=0)
    assert not torch.equal(metrics["loss"], plain_metrics["loss"])  # bfloat16 did run
    assert all(low.buffers[k].dtype == torch.float32 for k in low.layout.frozen)
    assert all(p.dtype == torch.float32 for p in low.params.values())
    whole = fx.sharding.gathered(low.params)
    moved = max((plain.params[k] - _lora().state_dict()[k]).abs().max().item()
                for k in plain.params if ".lora_B." in k)
    assert moved > 1e-3  # the adapters did train
    for k in plain.params:
        torch.testing.assert_close(whole[k], plain.params[k], rtol=0, atol=2e-3)
