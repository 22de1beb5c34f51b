"""transformers models as clients: a loss_fn may return the model's output object, in eager and
compiled (fullgraph) steps and in eval steps; a missing loss says what to pass."""

import pytest
import torch

import fxtrain as fx
from helpers import TRACED, extra


def _gpt2():
    transformers = extra("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # set, so the labels= path compiles in one graph
    return fx.TrainState.create(model, fx.optim.adamw(1e-2))


IDS = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))


def _with_labels(state, params, batch):
    return state.apply(params, batch, labels=batch, use_cache=False)  # a ModelOutput


def _explicit(state, params, batch):
    return _with_labels(state, params, batch).loss


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_loss_fn_may_return_the_models_output(compiled):
    state = _gpt2()
    step, ref = fx.make_train_step(_with_labels), fx.make_train_step(_explicit)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    new, metrics = step(state, IDS)
    expected, ref_metrics = ref(state, IDS)
    torch.testing.assert_close(metrics["loss"], ref_metrics["loss"])
    assert set(metrics) == set(ref_metrics)
    evaluated = fx.make_eval_step(_with_labels)(new, IDS)
    assert set(evaluated) == {"loss"} and evaluated["loss"].ndim == 0


def test_an_output_without_a_loss_names_labels():
    state = _gpt2()
    step = fx.make_train_step(lambda s, p, b: s.apply(p, b, use_cache=False))
    with pytest.raises(TypeError, match=r"\.loss is None; pass labels="):
        step(state, IDS)


def test_lora_through_peft_trains_only_the_adapter_and_reloads_with_peft(tmp_path):
    """peft's LoRA on a GPT-2: peft freezes the base weights, so TrainState.create keeps them as
    buffers and only the adapter trains; the base stays bitwise as it was; the trained module
    saves its adapter with peft, and peft loads it back onto a fresh base, same outputs."""
    transformers, peft = extra("transformers"), extra("peft")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)

    def base():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"
        return model

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                           fan_in_fan_out=True)
    model = peft.get_peft_model(base(), lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state = fx.TrainState.create(model, fx.optim.adamw(3e-2))
    assert state.params and all("lora_" in name for name in state.params)
    step = fx.make_train_step(_explicit)
    first = None
    for _ in range(10):
        state, metrics = step(state, IDS)
        first = metrics["loss"] if first is None else first
    assert float(metrics["loss"]) < float(first)
    assert all(torch.equal(state.buffers[n], frozen[n]) for n in frozen)  # base untouched
    trained = fx.trained_module(state)
    trained.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    trained.eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, trained(IDS).logits)
    lora_b = next(n for n in state.params if "lora_B" in n)
    assert not torch.equal(state.params[lora_b], torch.zeros_like(state.params[lora_b]))


def _fresh_gpt2(checkpointing=False):
    """A GPT-2 as transformers makes it: loss_type unset (its loss_function logs a one-time
    warning on the labels= path), its own activation checkpointing on if asked."""
    transformers = extra("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def test_the_labels_path_of_a_fresh_model_compiles_in_one_graph():
    """transformers' once-only logger call inside ``loss_function`` stopped a fullgraph trace
    ("logging.Logger method not supported"); the step has Dynamo trace it as a no-op."""
    model = _fresh_gpt2()
    assert getattr(model, "loss_type", None) is None  # the path that logs
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2))
    counts = torch._dynamo.utils.counters
    step = torch.compile(fx.make_train_step(_with_labels), fullgraph=True, backend=TRACED)
    for _ in range(2):
        state, metrics = step(state, IDS)
    assert counts["stats"]["unique_graphs"] == 1
    evaluated = torch.compile(fx.make_eval_step(_with_labels), fullgraph=True,
                              backend=TRACED)(state, IDS)
    assert evaluated["loss"].ndim == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_model_with_gradient_checkpointing_on_takes_the_autograd_path(compiled):
    """torch.func cannot run a model's own checkpointing (functorch's requires_grad_ error
    eagerly, Dynamo's unsafe side effect compiled): the default step (autodiff="auto") takes
    autograd's path for it, and trains it as the model without checkpointing trains;
    autodiff="func" named is refused, naming autodiff="autograd"."""
    state = fx.TrainState.create(_fresh_gpt2(checkpointing=True), fx.optim.sgd(0.1))
    wrap = (lambda s: torch.compile(s, fullgraph=True, backend=TRACED)) if compiled else \
        (lambda s: s)
    with pytest.raises(ValueError, match="activation checkpointing turned on.*"
                                         "autodiff='autograd'"):  # fit unwraps Dynamo's report
        fx.fit(state, wrap(fx.make_train_step(_with_labels, autodiff="func")), [IDS],
               max_steps=1, progress=False)
    torch._dynamo.reset()
    checkpointed, m1 = wrap(fx.make_train_step(_with_labels, donate=False))(state, IDS)
    plain = fx.TrainState.create(_fresh_gpt2(), fx.optim.sgd(0.1))
    reference, m2 = fx.make_train_step(_with_labels, autodiff="autograd")(plain, IDS)
    torch.testing.assert_close(m1["loss"], m2["loss"])
    for k, p in reference.params.items():  # recomputed, the same gradients (float32 rounding)
        torch.testing.assert_close(checkpointed.params[k], p, rtol=0, atol=1e-6)


def test_the_trainers_decay_names_resolve_a_tied_lm_head_to_its_one_tensor():
    """transformers' decay list for GPT-2 names lm_head.weight, which the state keeps once, as
    transformer.wte.weight (tied): it decays that tensor; biases and norms do not decay."""
    transformers = extra("transformers")
    model = _fresh_gpt2()
    names = transformers.Trainer.get_decay_parameter_names(None, model)
    assert "lm_head.weight" in names
    state = fx.TrainState.create(model, fx.optim.adamw(1e-2, weight_decay=0.1, mask=names))
    assert "lm_head.weight" not in state.params
    # the state's tied names, as its optimizer reads them
    decays = fx.optim.masks.by_name(names, state.params, "mask", tied=state.layout.tied)
    assert decays["transformer.wte.weight"] and decays["transformer.h.0.attn.c_attn.weight"]
    assert not decays["transformer.h.0.ln_1.weight"] and not decays["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match=r"names are no parameter's: \['lm_head.wieght'\]"):
        fx.TrainState.create(_fresh_gpt2(), fx.optim.adamw(1e-2, mask=["lm_head.wieght"]))
