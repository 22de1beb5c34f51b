"""``fx.find_batch_size`` on the CPU under a memory cap: the sizes it tries (doubling, then
bisection), the one it chooses, the state it was given left bitwise as it was, and the refusals."""

import pytest
import torch
from torch import nn

import fxtrain as fx
from fxtrain.loop._batch_size import _search, Trial
from helpers import TRACED


def loss_fn(state, params, batch):
    x, y = batch
    return ((state.apply(params, x) - y) ** 2).mean()


def _setup():
    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    y = x.sum(1, keepdim=True)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1))
    state = fx.TrainState.create(model, fx.optim.adamw(1e-3), seed=0)
    return state, (lambda b: fx.data.Batches((x, y), b, seed=0))


def test_the_search_doubles_then_bisects():
    """With a fake trial (sizes up to 100 fit), the order Lightning's power + binsearch takes."""
    tried = _search(lambda b: Trial(b, b <= 100, b), 4, None, 25)
    assert [t.batch_size for t in tried] == [4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102]
    assert max(t.batch_size for t in tried if t.fits) == 100  # 102 does not: within 1/32
    # the first size too large: halve, then bisect; max_size caps the doubling
    assert [t.batch_size for t in _search(lambda b: Trial(b, b <= 3, b), 16, None, 25)] == \
        [16, 8, 4, 2, 3]
    assert [t.batch_size for t in _search(lambda b: Trial(b, True, b), 4, 20, 25)] == \
        [4, 8, 16, 20]


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_cap_chooses_a_size_and_leaves_the_state(compiled):
    state, make_data = _setup()
    digest = fx.tree_digest(state)
    step = fx.make_train_step(loss_fn)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)  # the search's, not Inductor's
    found = fx.find_batch_size(state, step, make_data, init_size=32, max_bytes=2**20)
    sizes = [t.batch_size for t in found.tried]
    assert sizes[:4] == [32, 64, 128, 256]  # doubling until one does not fit
    first_miss = next(i for i, t in enumerate(found.tried) if not t.fits)
    assert all(t.fits for t in found.tried[:first_miss])
    assert all(t.why == "over max_bytes" for t in found.tried if not t.fits)
    # the chosen size fits, the next one tried above it does not, within 1/32
    above = min(t.batch_size for t in found.tried if not t.fits)
    assert found.largest < above <= found.largest + max(1, found.largest // 32)
    assert found.batch_size == int(found.largest * 0.9) and found.margin == 0.1
    # the peaks grow with the size, and the largest fits the cap with the state
    fits = sorted((t.batch_size, t.peak) for t in found.tried if t.fits)
    assert [p for _, p in fits] == sorted(p for _, p in fits)
    assert found.held.state + found.held.peak <= 2**20
    assert found.held.parameters == found.held.gradients == 4 * (32 * 128 + 128 + 128 + 1)
    # the state handed back is the state given, bitwise, and still usable
    assert fx.tree_digest(state) == digest
    data = found.data()
    assert data.batch_size == found.batch_size
    state = fx.fit(state, step, data, max_steps=2, progress=False)
    assert int(state.step) == 2


def test_deterministic_on_the_cpu():
    state, make_data = _setup()
    step = fx.make_train_step(loss_fn)
    kwargs = dict(init_size=256, max_bytes=2**20, steps=1, max_trials=4)
    a = fx.find_batch_size(state, step, make_data, **kwargs)
    b = fx.find_batch_size(state, step, make_data, **kwargs)
    assert len(a.tried) == 4 and len({t.fits for t in a.tried}) == 2
    assert a.tried == b.tried and a.batch_size == b.batch_size


def test_out_of_memory_is_caught_and_the_state_kept():
    """A step that raises torch.OutOfMemoryError above a size: caught, as on CUDA."""
    state, make_data = _setup()
    digest = fx.tree_digest(state)
    inner = fx.make_train_step(loss_fn)

    def step(state, batch, **kwargs):
        if batch[0].shape[0] > 200:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(state, batch, **kwargs)
    step.spec = fx.step_spec(inner)
    found = fx.find_batch_size(state, step, make_data, init_size=50, max_bytes=2**30, steps=1)
    assert [(t.batch_size, t.fits) for t in found.tried] == [
        (50, True), (100, True), (200, True), (400, False), (300, False), (250, False),
        (225, False), (212, False), (206, False)]
    assert found.tried[3].why == "out of memory" and found.tried[3].peak is None
    assert found.largest == 200 and found.batch_size == 180
    assert fx.tree_digest(state) == digest


def test_refusals():
    state, make_data = _setup()
    step = fx.make_train_step(loss_fn)
    with pytest.raises(ValueError, match="needs a cap: pass max_bytes"):
        fx.find_batch_size(state, step, make_data)
    with pytest.raises(ValueError, match="always donates"):
        fx.find_batch_size(state, fx.make_train_step(loss_fn, donate=True), make_data,
                           max_bytes=2**20)
    with pytest.raises(RuntimeError, match="no batch size fits, not even 1"):
        fx.find_batch_size(state, step, make_data, max_bytes=1000, steps=1)


def test_a_cuda_graphed_steps_trials_run_the_step_it_wraps():
    """No graph is captured at a trial's size: fit captures it at the size found (the class is
    built directly: cuda_graphed itself refuses a machine without CUDA)."""
    from fxtrain.step._graphs import CudaGraphed

    state, make_data = _setup()
    graphed = CudaGraphed(fx.make_train_step(loss_fn), warmup=2)
    found = fx.find_batch_size(state, graphed, make_data, init_size=512, max_bytes=2**20,
                               steps=1, max_trials=2)
    assert len(found.tried) == 2 and graphed.calls == 0 and graphed.graph is None


def test_issue_75_a_factory_that_ignores_the_size_is_refused_and_small_data_caps_the_search():
    """A data factory that does not honour the size asked (the whole set every time) was
    searched to a size no trial ran (60,397,977); now it is refused by name. Data smaller than a
    size counts as that size not fitting, so the search ends at the data's size."""
    state, _ = _setup()
    x, y = torch.randn(4096, 32), torch.randn(4096, 1)
    step = fx.make_train_step(loss_fn)
    with pytest.raises(ValueError, match=r"make_data\(2\) gave batches of 4096 examples: it must "
                       r"build batches of the size it is given"):
        fx.find_batch_size(state, step, lambda b: [(x, y)], max_bytes=2**30, steps=1)
    found = fx.find_batch_size(state, step, lambda b: fx.data.Batches(
        (x[:100], y[:100]), b, drop_last=False), max_bytes=2**30, steps=1)
    assert found.largest == 100 and found.batch_size == 90
    assert "the data gives batches of 100" in found.trace()
    assert all(t.batch_size <= 100 for t in found.tried if t.fits)


@pytest.mark.parametrize("kwargs, message", [
    ({"init_size": 2.5}, "init_size must be an int, got 2.5"),
    ({"init_size": "16"}, "init_size must be an int, got '16'"),
    ({"max_bytes": "1MiB"}, r"max_bytes must be an int or None, got '1MiB' \(in bytes: 2\*\*20"),
    ({"max_size": 8.0}, "max_size must be an int or None, got 8.0"),
    ({"margin": "0.1"}, r"margin must be a number in \[0, 1\), got '0.1'"),
])
def test_issue_75_arguments_of_the_wrong_type_are_named(kwargs, message):
    state, make_data = _setup()
    kwargs = {"max_bytes": 2**30, **kwargs}
    with pytest.raises(TypeError, match=message):
        fx.find_batch_size(state, fx.make_train_step(loss_fn), make_data, **kwargs)


def test_issue_75_the_cpu_allocator_s_refusal_is_out_of_memory():
    """``DefaultCPUAllocator: can't allocate memory`` (a RuntimeError) ends a trial as not
    fitting, as torch.OutOfMemoryError does, instead of ending the search."""
    from fxtrain._memory import out_of_memory
    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1099511627776 bytes.")
    assert out_of_memory(refusal) and not out_of_memory(RuntimeError("shape mismatch"))
    wrapped = RuntimeError("compiling")
    wrapped.__cause__ = refusal
    assert out_of_memory(wrapped)


def test_issue_75_sizes_past_the_data_that_the_factory_refuses_do_not_fit():
    """``batch_size: auto`` on a set smaller than the sizes the search doubles to: Batches
    refuses a batch larger than the data (drop_last), which ended the search; those sizes now
    do not fit, with the factory's message in the trace. The first size's refusal still
    raises (a factory that fails at any size is the user's to fix)."""
    state, _ = _setup()
    x, y = torch.randn(40, 32), torch.randn(40, 1)
    make = lambda b: fx.data.Batches((x, y), b)  # noqa: E731
    found = fx.find_batch_size(state, fx.make_train_step(loss_fn), make, max_bytes=2**30, steps=1)
    assert found.largest == 40 and "40 examples make no batch of 64" in found.trace()
    with pytest.raises(ValueError, match="40 examples make no batch of 64"):
        fx.find_batch_size(state, fx.make_train_step(loss_fn), make, init_size=64,
                           max_bytes=2**30, steps=1)
