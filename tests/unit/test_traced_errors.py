"""fxtrain's errors raised while torch.compile traces a step reach the user as themselves, with
fxtrain's message on the first line (Dynamo wrapped them in 'Observed exception' or 'RuntimeError
when making fake tensor call'); the model's own errors come out first too."""

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batch, mlp, xent

import fxtrain as fx

X, Y = classification_batch(n=32, seed=2)


def per_example(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y, reduction="none")  # not reduced


def fit(loss_fn, batches, backend="inductor"):
    step = torch.compile(fx.make_train_step(loss_fn), fullgraph=True, backend=backend)
    return fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)), step, batches, max_epochs=1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_loss_that_is_not_0d_names_the_fix(backend):
    with pytest.raises(TypeError) as error:
        fit(per_example, [(X[:16], Y[:16])], backend)
    first = str(error.value).splitlines()[0]
    assert first.startswith("loss_fn must return a 0-d loss tensor") and ".mean()" in first
    assert error.value.__cause__ is None  # no compiler report in front of it


def test_a_batch_the_model_cannot_take_gives_the_models_error_first():
    with pytest.raises(RuntimeError) as error:
        fit(xent, [(torch.randn(16, 5), Y[:16])], "eager")
    assert "Dynamo" not in str(error.value).splitlines()[0]
    assert "mat" in str(error.value) or "reduction dim" in str(error.value)
    assert any("torch.compile traced the train step" in n for n in error.value.__notes__)


def test_the_same_errors_eagerly():
    with pytest.raises(TypeError, match="loss_fn must return a 0-d loss tensor"):
        fx.fit(fx.TrainState.create(mlp(), fx.optim.sgd(0.1)), fx.make_train_step(per_example),
               [(X[:16], Y[:16])], max_epochs=1)


@pytest.mark.parametrize("message, kind, text", [
    # torch 2.14's Dynamo keeps only the text of an error raised while it traces
    ('raised exception RuntimeError("Dynamo failed to run FX node with fake tensors: '
     'call_function <built-in function linear>(*(FakeTensor(..., size=(16, 5)),), **{}): got '
     'RuntimeError(\'a and b must have same reduction dim, but got [16, 5] X [8, 16].\')")',
     RuntimeError, "a and b must have same reduction dim, but got [16, 5] X [8, 16]."),
    ("raised exception ValueError('too many values to unpack (expected 2)')", ValueError,
     "too many values to unpack (expected 2)"),
    ("raised exception KeyError(\"'labels'\")", KeyError, "\"'labels'\""),
])
def test_the_models_error_is_read_back_from_dynamos_observed_text(message, kind, text):
    from fxtrain._torch.traced_errors import _observed

    error = _observed(message)
    assert type(error) is kind and str(error) == text


def test_observed_text_that_names_no_builtin_error_gives_nothing():
    from fxtrain._torch.traced_errors import _observed

    assert _observed("raised exception MyError('x')") is None
    assert _observed("something else entirely") is None
