import warnings

import pytest
import torch
import torch.nn.functional as F

import fxtrain as fx
from fxtrain import optim
from helpers import TRACED, classification_batch, convnet, graph_count, mlp, xent

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)


def _full_tx(total=100):
    schedule = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 10, total)
    return optim.multi_steps(optim.chain(optim.clip_by_global_norm(1.0),
                                         optim.adamw(schedule, weight_decay=1e-4)), 2)


@pytest.mark.slow
@pytest.mark.parametrize("model,image", [(lambda: mlp(dropout=0.1), False), (convnet, True)],
                         ids=["mlp", "convnet"])
def test_compiled_train_and_eval_steps_one_graph_no_recompiles(model, image):
    state = fx.TrainState.create(model(), _full_tx(), seed=0)
    # the promise is Dynamo's (one graph each, no recompiles, no warning of a traced-around
    # call): the traced backend; Inductor's numerics are test_compiled_step_matches_eager_step's
    train_step = torch.compile(fx.make_train_step(xent), fullgraph=True, backend=TRACED)
    eval_step = torch.compile(fx.make_eval_step(xent), fullgraph=True, backend=TRACED)
    batches = [classification_batch(seed=i, image=image, classes=10 if image else 4) for i in range(4)]
    with warnings.catch_warnings(record=True) as caught:  # Dynamo warns of what it traces
        warnings.simplefilter("always")                   # around (conftest clears its once-set)
        state, _ = train_step(state, batches[0])
        eval_step(state, batches[0])
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert graph_count() == 2
    first_loss = None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(100):
            state, metrics = train_step(state, batches[i % 4])
            first_loss = first_loss if first_loss is not None else float(metrics["loss"])
            if i % 25 == 0:
                eval_step(state, batches[0])
    assert graph_count() == 2
    assert int(state.step) == 101 and float(metrics["loss"]) < first_loss
    assert set(metrics) >= {"loss", "grad_norm", "learning_rate", "accuracy"}


def test_compiled_step_matches_eager_step():
    state = fx.TrainState.create(convnet(), _full_tx(), seed=0)
    batch = classification_batch(image=True, classes=10)
    eager_state, eager_metrics = fx.make_train_step(xent)(state, batch)
    comp_state, comp_metrics = torch.compile(fx.make_train_step(xent), fullgraph=True)(state, batch)
    torch.testing.assert_close(comp_metrics["loss"], eager_metrics["loss"])
    for k in state.params:
        torch.testing.assert_close(comp_state.params[k], eager_state.params[k], atol=1e-6, rtol=1e-5)


def test_metrics_and_grad_stats():
    state = fx.TrainState.create(mlp(), optim.adamw(1e-3))
    _, metrics = fx.make_train_step(xent, grad_stats=True)(state, classification_batch())
    names = list(state.params)
    assert {f"grad_norm/{n}" for n in names} <= set(metrics)
    norms = torch.stack([metrics[f"grad_norm/{n}"] for n in names])
    assert torch.allclose(metrics["grad_norm"], norms.norm())
    assert torch.equal(metrics["grad_norm_max"], norms.max())
    assert torch.equal(metrics["grad_norm_min"], norms.min())
    assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())


def test_grad_stats_compile_in_one_graph():
    state = fx.TrainState.create(mlp(), optim.adamw(1e-3))
    step = torch.compile(fx.make_train_step(xent, grad_stats=True), fullgraph=True, backend="eager")
    for i in range(3):
        state, _ = step(state, classification_batch(seed=i))
    assert graph_count() == 1


def test_in_step_callbacks_thread_state_and_controls():
    def stop_when_small(state, event):
        return state, fx.Control(stop=event.metrics["loss"] < 100.0)

    state = fx.TrainState.create(mlp(), optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(xent, callbacks=[stop_when_small]), fullgraph=True,
                         backend="eager")
    state, metrics = step(state, classification_batch())
    assert bool(metrics["control/stop"]) and not bool(metrics["control/save"])
    assert graph_count() == 1


def test_eval_step_takes_state_batch_functions_and_runs_in_eval_mode():
    state = fx.TrainState.create(mlp(dropout=0.9), optim.sgd(0.1))
    batch = classification_batch()
    a = fx.make_eval_step(lambda s, b: {"out": s.apply(s.params, b[0]).sum()})(state, batch)
    b = fx.make_eval_step(lambda s, b: {"out": s.apply(s.params, b[0]).sum()})(state, batch)
    assert torch.equal(a["out"], b["out"])  # dropout off in eval mode
    assert state.module.training  # mode restored


def test_batch_with_other_structure_or_dtype_is_rejected():
    state = fx.TrainState.create(mlp(), optim.sgd(0.1))
    step = fx.make_train_step(xent)
    x, y = classification_batch()
    state, _ = step(state, (x, y))
    with pytest.raises(ValueError, match="differs from the first one"):
        step(state, (x.double(), y))
    with pytest.raises(ValueError, match="differs from the first one"):
        step(state, {"x": x, "y": y})


def test_batch_change_is_rejected_when_compiled():
    state = fx.TrainState.create(mlp(), optim.sgd(0.1))
    step = torch.compile(fx.make_train_step(xent), fullgraph=True, backend="eager")
    x, y = classification_batch()
    state, _ = step(state, (x, y))
    with pytest.raises(Exception, match="differs from the first one"):
        step(state, (x, y.int()))


@pytest.mark.parametrize("bad,match", [
    (lambda logits, y: F.cross_entropy(logits, y, reduction="none"), "0-d loss"),
    (lambda logits, y: (logits.argmax(-1) == y).sum(), "floating point"),
    (lambda logits, y: (F.cross_entropy(logits, y), [1.0]), "aux must be a dict"),
    (lambda logits, y: (F.cross_entropy(logits, y), {"loss": logits.sum()}), "reserved metric"),
])
def test_bad_loss_is_a_clear_error(bad, match):
    state = fx.TrainState.create(mlp(), optim.sgd(0.1))

    def loss_fn(state, params, batch):
        return bad(state.apply(params, batch[0]), batch[1])

    with pytest.raises((TypeError, ValueError), match=match):
        fx.make_train_step(loss_fn)(state, classification_batch())
