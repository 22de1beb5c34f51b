"""CUDA graphs: ``fx.cuda_graphed(step)`` replays a captured step and gives the states the step
itself gives, bit for bit. The GPU tests are marked ``hardware`` (CI has no GPU); the errors
that need no GPU run everywhere."""

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import classification_batch, mlp, xent

import fxtrain as fx
from fxtrain.donation import DonatedError
from fxtrain.step._graphs import CudaGraphed

GPU = torch.cuda.is_available()


def gpu(test):
    """A test that needs a CUDA GPU (``hardware``: CI has none, and may skip it)."""
    return pytest.mark.hardware(pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")(test))


def _state(device="cuda", callbacks=()):
    return fx.TrainState.create(mlp((8, 16, 4), dropout=0.1).to(device),
                                fx.optim.adamw(1e-2, weight_decay=1e-2), seed=0,
                                callbacks=callbacks)


def _batches(n, device="cuda"):
    return [tuple(t.to(device) for t in classification_batch(seed=i)) for i in range(n)]


def _compiled(**options):
    return torch.compile(fx.make_train_step(xent, **options), fullgraph=True)


def test_cuda_graphed_needs_a_gpu_and_a_positive_warmup(monkeypatch):
    with pytest.raises(ValueError, match="warmup must be a positive int"):
        fx.cuda_graphed(fx.make_train_step(xent), warmup=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        fx.cuda_graphed(fx.make_train_step(xent))


def test_fit_refuses_a_host_callback_that_skips_with_a_graphed_step():
    """The graphed step always donates, so fit could not undo a host callback's skip."""
    state = _state("cpu")
    step = CudaGraphed(fx.make_train_step(xent), warmup=2)  # refused before any call
    data = fx.data.Batches(classification_batch(n=64), 16)
    with pytest.raises(ValueError, match="nan_guard may skip a step.*always donates"):
        fx.fit(state, step, data, callbacks=[fx.callbacks.nan_guard("skip")], max_steps=2)


@gpu
@pytest.mark.parametrize("in_step", [False, True], ids=["plain", "in_step_callbacks"])
def test_graphed_steps_equal_the_step_bit_for_bit(in_step):
    cbs = [fx.callbacks.nan_guard("skip"), fx.callbacks.ema(0.9)] if in_step else []
    batches = _batches(8)
    batches[5] = (torch.full_like(batches[5][0], float("nan")), batches[5][1])
    ref, graphed = _state(callbacks=cbs), _state(callbacks=cbs)
    plain = _compiled(callbacks=cbs, donate=True)
    step = fx.cuda_graphed(_compiled(callbacks=cbs), warmup=2)
    for batch in batches:
        ref, ref_metrics = plain(ref, batch)
        before = graphed
        graphed, metrics = step(graphed, batch)
        with pytest.raises(DonatedError):
            step(before, batch)  # the given state was donated
        assert metrics.keys() == ref_metrics.keys()
        for k in metrics:  # bit for bit (the NaN batch's loss is NaN in both)
            torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=0, atol=0,
                                       equal_nan=True, msg=k)
    assert step.graph is not None
    assert fx.tree_digest(graphed) == fx.tree_digest(ref)


@gpu
def test_metrics_of_earlier_steps_stay_valid():
    """Each call's metrics are copies: the next replay does not overwrite them."""
    step = fx.cuda_graphed(_compiled(), warmup=1)
    state, losses = _state(), []
    for batch in _batches(6):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    ref, ref_losses = _state(), []
    plain = _compiled(donate=True)
    for batch in _batches(6):
        ref, metrics = plain(ref, batch)
        ref_losses.append(metrics["loss"])
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    assert len(set(torch.stack(losses).tolist())) == 6


@gpu
def test_other_batches_and_other_states_still_step_right():
    """A short batch runs the step itself; a state on other tensors (a copy, a restored
    checkpoint) is captured anew; both keep giving the step's results."""
    batches = _batches(6)
    batches[3] = tuple(t[:5] for t in batches[3])
    step = fx.cuda_graphed(_compiled(), warmup=1)
    plain = _compiled(donate=True)
    state, ref = _state(), _state()
    for i, batch in enumerate(batches):
        state, _ = step(state, batch)
        ref, _ = plain(ref, batch)
        if i == 2:  # continue from a copy: other tensors, same values
            state = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                    state)
    assert fx.tree_digest(state) == fx.tree_digest(ref)


@gpu
def test_k_steps_per_call_under_a_graph():
    batches = _batches(8)
    stacked = [pytree.tree_map(lambda *ls: torch.stack(ls), *batches[i:i + 4]) for i in (0, 4)]
    step = fx.cuda_graphed(_compiled(steps_per_call=4), warmup=1)
    assert step.steps_per_call == 4
    state = _state()
    for batch in stacked:
        state, _ = step(state, batch)
    ref, plain = _state(), _compiled(donate=True, steps_per_call=4)  # the same kernels
    for batch in stacked:
        ref, _ = plain(ref, batch)
    assert fx.tree_digest(state) == fx.tree_digest(ref)


@gpu
def test_fit_with_a_graphed_step_equals_fit_with_the_step():
    x, y = classification_batch(n=256)
    data = fx.data.Batches((x.cuda(), y.cuda()), 32)
    seen = {}

    def plan(state, event):
        if event.kind == "train_begin":
            seen.update(event.metrics)

    graphed = fx.fit(_state(), fx.cuda_graphed(_compiled()), data, max_steps=20,
                     callbacks=[plan])
    assert seen["cuda_graphs"] is True and seen["compiled"] is True
    ref = fx.fit(_state(), _compiled(), data, max_steps=20)
    assert fx.tree_digest(graphed) == fx.tree_digest(ref)


@gpu
def test_graphs_refuse_what_they_cannot_replay():
    step = fx.cuda_graphed(_compiled(donate=False), warmup=1)
    with pytest.raises(ValueError, match=r"new tensor for state\.step.*donate=True"):
        step(_state(), _batches(1)[0])
    step = fx.cuda_graphed(_compiled(), warmup=1)
    state = _state("cpu")
    batch = _batches(1, "cpu")[0]
    state, _ = step(state, batch)  # warm-up: an ordinary step
    with pytest.raises(ValueError, match=r"step is on cpu.*must be on the GPU"):
        step(state, batch)
