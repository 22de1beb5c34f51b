"""swa: equal to torch.optim.swa_utils.AveragedModel on the same parameter sequence, one graph
inside a compiled step, its state through a checkpoint; update_bn equal to torch's."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

import fxtrain as fx
from fxtrain.callbacks import fold
from helpers import TRACED, classification_batch, graph_count, mlp, xent


def parameter_sequence(model, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g).to(dtype) for k, v in model.named_parameters()}
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start, every", [(0, 1), (3, 2), (5, 4)])
def test_equal_to_torch_averaged_model_on_the_same_parameters(dtype, start, every):
    model = mlp().to(dtype)
    reference = AveragedModel(model)
    cb = fx.callbacks.swa(start, every=every)
    state = fx.TrainState.create(model, fx.optim.sgd(0.1), callbacks=[cb])
    for step, params in enumerate(parameter_sequence(model, 20, dtype), start=1):
        state, _ = fold([cb], state.replace(params=params), fx.Event("step_end", step, 0, {}))
        if step >= start and (step - start) % every == 0:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(params[name])
            reference.update_parameters(model)
    average = state.callbacks["swa"]
    assert int(average.n_averaged) == int(reference.n_averaged) > 1
    expected = dict(reference.module.named_parameters())
    for name, p in average.params.items():
        assert p.dtype == dtype and torch.equal(p, expected[name].detach()), name


def test_inside_a_compiled_step_one_graph_and_equal_to_the_host():
    cb = fx.callbacks.swa(4, every=3)
    batch = classification_batch()
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    step = torch.compile(fx.make_train_step(xent, callbacks=[cb]), fullgraph=True, backend=TRACED)
    plain = fx.make_train_step(xent)  # the same training, averaged by folding on the host
    host = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(12):
            state, _ = step(state, batch)
            host, _ = plain(host, batch)
            host, _ = fold([cb], host, fx.Event("step_end", int(host.step), 0, {}))
    assert graph_count() == 1
    a, b = state.callbacks["swa"], host.callbacks["swa"]
    assert int(a.n_averaged) == int(b.n_averaged) == 3  # steps 4, 7, 10
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k])
    assert not torch.equal(a.params["0.weight"], state.params["0.weight"])


def test_with_swa_params_swaps_in_the_average_and_before_any_update_the_initial_params():
    cb = fx.callbacks.swa(100)
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.5), callbacks=[cb])
    initial = {k: v.clone() for k, v in state.params.items()}
    state = fx.fit(state, fx.make_train_step(xent), [classification_batch()] * 5, max_epochs=1,
                   callbacks=[cb])
    swapped = fx.callbacks.with_swa_params(state)
    assert int(state.callbacks["swa"].n_averaged) == 0
    assert all(torch.equal(swapped.params[k], initial[k]) for k in initial)
    assert not torch.equal(state.params["0.weight"], initial["0.weight"])


def test_state_goes_through_a_checkpoint_and_averages_on_the_same(tmp_path):
    cb = fx.callbacks.swa(0)
    model = mlp()
    state = fx.TrainState.create(model, fx.optim.sgd(0.1), callbacks=[cb])
    seq = parameter_sequence(model, 4, torch.float32)
    for step, params in enumerate(seq[:3], start=1):
        state, _ = fold([cb], state.replace(params=params), fx.Event("step_end", step, 0, {}))
    fx.checkpoint.save(tmp_path / "ckpt", state)
    restored = fx.checkpoint.restore(tmp_path / "ckpt",
                                     like=fx.TrainState.create(mlp(), fx.optim.sgd(0.1),
                                                               callbacks=[cb]))
    assert fx.tree_digest(restored) == fx.tree_digest(state)
    out = [fold([cb], s.replace(params=seq[3]), fx.Event("step_end", 4, 0, {}))[0]
           for s in (state, restored)]
    assert fx.tree_digest(out[0].callbacks) == fx.tree_digest(out[1].callbacks)
    expected = sum(p["0.weight"] for p in seq) / 4
    torch.testing.assert_close(out[1].callbacks["swa"].params["0.weight"], expected)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8))


@pytest.mark.parametrize("batches", [5, 0])  # none: the statistics are reset, as torch's are
def test_update_bn_equals_torch_update_bn(batches):
    model = bn_model()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 1, 8, 8, generator=g) * 3 + 1, torch.zeros(6))
            for _ in range(batches)]
    state = fx.TrainState.create(model, fx.optim.sgd(0.1))
    def moved(b):  # running statistics that are not the reset values
        return b + 0.5 if b.is_floating_point() else b + 3
    state = state.replace(buffers={k: moved(v) for k, v in state.buffers.items()})
    with torch.no_grad():  # the same in the reference
        for b in model.buffers():
            b.copy_(moved(b))
    model.eval()  # both put the model back in the mode they found it in
    state.module.eval()
    reference = copy.deepcopy(model)
    torch_update_bn(data, reference)
    new = fx.callbacks.update_bn(state, data)
    expected = dict(reference.named_buffers())
    assert set(new.buffers) == set(expected)
    for name, buf in new.buffers.items():
        torch.testing.assert_close(buf, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert int(new.buffers["1.num_batches_tracked"]) == batches
    assert float(state.buffers["1.running_var"][0]) == 1.5  # the given state is unchanged
    assert state.module[1].momentum == 0.3 and not state.module.training  # put back


def test_update_bn_without_batchnorm_changes_nothing():
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    assert fx.callbacks.update_bn(state, [classification_batch()]) is state


@pytest.mark.parametrize("kwargs, match", [({"start": -1}, "start must be an int >= 0"),
                                           ({"every": 0}, "every must be an int >= 1"),
                                           ({"every": 1.5}, "every must be an int >= 1")])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fx.callbacks.swa(**kwargs)
