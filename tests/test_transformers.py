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
