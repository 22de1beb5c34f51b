"""``fx.lr_find`` on the demo's MLP: the suggestion lies where training converges, the curve
falls then blows up, the model given is not changed, and a bad range is a clear error."""

import functools

import pytest
import torch

import fxtrain as fx
from fxtrain.apps.demo.tasks import make_task


@pytest.fixture(scope="module")
def digits():
    task = make_task("mlp", 0)
    return task, fx.data.Batches(task.train, 64, seed=0)


def _trained_loss(task, data, lr, steps=100):
    state = fx.TrainState.create(task.model, fx.optim.adamw(lr, weight_decay=1e-4), seed=0)
    state = fx.fit(state, fx.make_train_step(task.loss_fn), data, max_steps=steps,
                   progress=False)
    return float(fx.evaluate(fx.make_eval_step(task.loss_fn), state, [task.test])["loss"])


def test_the_suggestion_trains_the_demo_mlp_and_the_range_blows_up(digits, tmp_path):
    task, data = digits
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    found = fx.lr_find(task.model, functools.partial(fx.optim.adamw, weight_decay=1e-4),
                       task.loss_fn, data, min_lr=1e-6, max_lr=10.0, steps=60)
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    assert found.suggestion is not None and 1e-5 < found.suggestion < 1.0, found.suggestion
    assert min(found.losses) < 0.9 * found.losses[0]  # the loss fell ...
    assert found.losses[-1] > 2 * min(found.losses)  # ... then blew up
    start = float(fx.evaluate(fx.make_eval_step(task.loss_fn),
                              fx.TrainState.create(task.model, fx.optim.sgd(0.0)),
                              [task.test])["loss"])
    assert _trained_loss(task, data, found.suggestion) < 0.3 * start  # it converges there
    figure = found.plot(path=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 0 and figure.axes[0].get_xscale() == "log"


def test_the_plot_keeps_pyplots_backend():
    """plot() draws with the backend in use: it switched to Agg once, and a notebook's inline
    backend then never showed the figure (06_config_run's page had none)."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    found = fx.LrFind(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.0, 3.0], raw_losses=[2.0, 1.0, 3.0],
                      suggestion=1e-2, stopped_early=False)
    plt.switch_backend("svg")
    try:
        figure = found.plot()
        assert matplotlib.get_backend() == "svg"
        plt.close(figure)
    finally:
        plt.switch_backend(before)


def test_a_divergence_stops_the_test_early(digits):
    task, data = digits
    found = fx.lr_find(task.model, fx.optim.sgd, task.loss_fn, data, min_lr=1.0, max_lr=1e6,
                       steps=100)
    assert found.stopped_early and len(found.lrs) < 100


@pytest.mark.parametrize("kwargs, message", [
    ({"min_lr": 1.0, "max_lr": 0.1}, "0 < min_lr < max_lr"),
    ({"steps": 1}, "at least 2"),
])
def test_a_bad_range_is_a_clear_error(digits, kwargs, message):
    task, data = digits
    with pytest.raises(ValueError, match=message):
        fx.lr_find(task.model, fx.optim.sgd, task.loss_fn, data, **kwargs)
