"""Buffer donation: a donating step writes the next state into the old one's storage, the old
state refuses every later use, and checkpoints never see a later step's values."""

import threading

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import classification_batch, convnet, graph_count, mlp, xent

import fxtrain as fx
from fxtrain.donation import DonatedError

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)

DONATED = "donated to a train step.*use the state the step returned"


def _state(callbacks=(), model=mlp, **kw):
    return fx.TrainState.create(model(**kw), fx.optim.adamw(1e-2, weight_decay=1e-2), seed=0,
                                callbacks=callbacks)


def _storage(state):
    """The addresses of the state's step, parameter, buffer and optimizer-state tensors."""
    leaves = pytree.tree_leaves((state.step, state.params, state.buffers, state.opt_state))
    return [t.data_ptr() for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_donated_state_raises_on_every_use_and_the_result_equals_a_pure_step(compiled,
                                                                              tmp_path):
    batch = classification_batch(image=True, classes=10)
    donating, pure = fx.make_train_step(xent, donate=True), fx.make_train_step(xent)
    if compiled:  # compiled, the update is the composable one (eager: fused, fx.optim.fused)
        donating = torch.compile(donating, fullgraph=True, backend="eager")
        pure = torch.compile(pure, fullgraph=True, backend="eager")
    old = _state(model=convnet)
    expected, _ = pure(old, batch)  # a pure step leaves `old` usable
    storage = _storage(old)
    new, _ = donating(old, batch)
    assert fx.tree_digest(new) == fx.tree_digest(expected)  # the values of a pure step...
    assert _storage(new) == storage  # ...written into the old state's tensors
    uses = [lambda: old.params["0.weight"], lambda: list(old.params), lambda: old.step + 1,
            lambda: int(old.step), lambda: old.opt_state[0],
            lambda: fx.tree_digest(old), lambda: fx.checkpoint.save(tmp_path / "c", old),
            lambda: fx.make_train_step(xent)(old, batch), lambda: old.apply_gradients({})]
    for use in uses:
        with pytest.raises(DonatedError, match=DONATED):
            use()
    with pytest.raises(Exception, match="donated to a train step"):
        donating(old, batch)
    assert not (tmp_path / "c").exists()


def test_donation_with_in_step_callbacks_equals_pure_steps_in_one_graph():
    """early_stopping keeps the best parameters (selected from the old ones), nan_guard may
    revert a step, ema follows the parameters: donating gives the values of pure steps, in one
    graph that never recompiles."""
    cbs = [fx.callbacks.early_stopping("loss", patience=2, event="step_end", restore_best=True),
           fx.callbacks.nan_guard("skip"), fx.callbacks.ema(0.9)]
    batches = [classification_batch(seed=i) for i in range(6)]
    pure_step = torch.compile(fx.make_train_step(xent, callbacks=cbs), backend="eager")
    step = torch.compile(fx.make_train_step(xent, callbacks=cbs, donate=True), fullgraph=True,
                         backend="eager")
    pure, state = _state(cbs, dropout=0.1), _state(cbs, dropout=0.1)
    for i in range(12):
        pure, _ = pure_step(pure, batches[i % 6])
    before = graph_count()
    for i in range(12):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            state, _ = step(state, batches[i % 6])
    assert graph_count() - before == 1
    assert fx.tree_digest(state) == fx.tree_digest(pure)
    assert bool(state.callbacks["early_stopping"].stopped)  # the skip path was taken too


def test_an_async_checkpoint_never_saves_a_later_steps_values(tmp_path, monkeypatch):
    """Save, then step (overwriting the state in place) while the write is held back: the
    checkpoint holds the saved step's bytes."""
    step = fx.make_train_step(xent, donate=True)
    state, _ = step(_state(), classification_batch())
    saved = fx.tree_digest(state)
    release = threading.Event()
    manager = fx.checkpoint.CheckpointManager(tmp_path, async_save=True)
    write = manager._write
    monkeypatch.setattr(manager, "_write", lambda *a: (release.wait(30), write(*a)))
    assert manager.save(state)
    for i in range(3):  # the saved state's tensors now hold steps 2, 3, 4
        state, _ = step(state, classification_batch(seed=i))
    release.set()
    manager.wait()
    restored = manager.restore(like=state)
    assert int(restored.step) == 1 and fx.tree_digest(restored) == saved


def test_fit_donates_its_state_and_equals_pure_steps():
    data = fx.data.Batches(classification_batch(n=64, seed=1), 16, seed=0)
    start = _state(dropout=0.1)
    storage = _storage(start)
    step = torch.compile(fx.make_train_step(xent), fullgraph=True, backend="eager")
    end = fx.fit(start, step, data, max_steps=10)
    assert _storage(end) == storage  # trained in the storage of the state fit was given
    with pytest.raises(DonatedError, match=DONATED):
        start.params["0.weight"]
    pure = _state(dropout=0.1)
    # compiled as fit's step is (eager, AdamW runs fxtrain.optim.fused: other roundings)
    pure_step = torch.compile(fx.make_train_step(xent, donate=False), backend="eager")
    position = data.init()
    for _ in range(10):
        batch, position, _ = data.next(position)
        pure, _ = pure_step(pure, batch)
    assert fx.tree_digest(end.replace(data=None)) == fx.tree_digest(pure)


def test_a_host_callback_that_skips_turns_donation_off_in_fit():
    """A host callback that may skip a step (early_stopping on step_end) needs the step's old
    values, so fit keeps them (the state given stays usable). Its stop flag, a tensor, is read
    at the end of the step that raised it, so no later step is taken."""
    es = fx.callbacks.early_stopping("loss", patience=1, min_delta=100.0, event="step_end")
    data = fx.data.Batches(classification_batch(n=160, seed=1), 16, seed=0)
    start = _state()
    end = fx.fit(start, fx.make_train_step(xent), data, max_steps=20, callbacks=[es],
                 sync_every=5)
    assert int(end.step) == 2  # stopped at step 2, read at once
    two = fx.fit(_state(), fx.make_train_step(xent), data, max_steps=2)
    assert fx.tree_digest(end.params) == fx.tree_digest(two.params)
    fx.tree_digest(start)  # not donated: still usable


def test_a_skip_from_a_plain_host_function_under_donation_is_a_clear_error():
    skip = lambda s, e: (s, fx.Control(skip=e.kind == "step_end" and e.step == 2))  # noqa: E731
    data = fx.data.Batches(classification_batch(n=64, seed=1), 16, seed=0)
    with pytest.raises(ValueError, match="asked to skip step 2, but fit donated that step.s state"):
        fx.fit(_state(), fx.make_train_step(xent), data, max_steps=5, callbacks=[skip])


def _step_peak_trees(step, state, batch):
    """The most a step allocates above what it was given (torch.profiler's count of the CPU
    allocator), in trees of the parameters' size."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    size = sum(p.numel() * p.element_size() for p in state.params.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state, _ = step(state, batch, donate=True)
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        with open(f"{folder}/trace.json") as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return state, max(totals) / size


def test_an_eager_donated_adamw_step_updates_the_moments_in_place_as_torch_optim_does():
    """Issue 61: an eager step that donates its state updates it in place as torch.optim.AdamW
    does: Adam's new moments over the old ones, the direction, its weight decay and learning
    rate in one temporary tree, the parameters by adding into them. The step's peak above its
    state is the gradients, that direction and one parameter's temporary (2.1 trees of the
    parameters' size; the activations of a batch of 4 are 0.1 of one), not 5 (3.1 with the
    moments alone in place); and the bits are a non-donating step's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(8)])
    make = lambda: fx.TrainState.create(model, fx.optim.adamw(1e-3, weight_decay=0.1))  # noqa: E731
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    batch = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    donated, _ = step(make(), batch, donate=True)  # the first step makes the moments
    donated, peak = _step_peak_trees(step, donated, batch)
    kept = make()
    for _ in range(2):
        kept, _ = step(kept, batch)
    assert peak < 2.5, f"the donated eager step peaked at {peak:.2f} parameter trees"
    for a, b in zip(pytree.tree_leaves((donated.params, donated.opt_state)),
                    pytree.tree_leaves((kept.params, kept.opt_state))):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("wrap", ["apply_if_finite", "multi_steps"])
def test_a_wrapper_keeps_its_inner_transforms_old_state_in_a_donated_eager_step(wrap):
    """Review of issue 61's in-place updates: a wrapper around a bare transform
    (``apply_if_finite(scale_by_adam())``, ``multi_steps(scale_by_adam(), 2)``) chooses between
    its inner transform's new state and its old one, so that inner state is not written over
    in place: a donated eager run (a non-finite gradient skipped, micro-batches accumulated)
    ends with a non-donating run's bits. Both took the moments in place before the fix."""
    tx = {"apply_if_finite": lambda: fx.optim.apply_if_finite(fx.optim.scale_by_adam(), 5),
          "multi_steps": lambda: fx.optim.multi_steps(fx.optim.scale_by_adam(), 2)}[wrap]()
    model = torch.nn.Linear(4, 2)
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 4, generator=g) for _ in range(4)]
    if wrap == "apply_if_finite":
        batches[1][0, 0] = float("nan")  # a non-finite gradient in the second step
    donated, kept = fx.TrainState.create(model, tx), fx.TrainState.create(model, tx)
    for batch in batches:
        donated, _ = step(donated, batch, donate=True)
        kept, _ = step(kept, batch)
    for a, b in zip(pytree.tree_leaves((donated.params, donated.opt_state)),
                    pytree.tree_leaves((kept.params, kept.opt_state))):
        assert a is None and b is None or torch.equal(a, b)


def test_a_donated_eager_step_that_fails_after_writing_gives_its_state_up():
    """An eager donated step writes Adam's moments and the parameters into the state as it
    goes; an error after the first write leaves that state half-updated, so it is given up
    (every use raises DonatedError) rather than left readable with the next step's values."""
    def failing(grads, state, params=None):
        raise ValueError("a transform failed after Adam wrote its moments")

    tx = fx.optim.chain(fx.optim.scale_by_adam(), fx.optim.GradientTransformation(
        lambda params: (), failing))
    state = fx.TrainState.create(mlp(), tx, seed=0)
    with pytest.raises(ValueError, match="after Adam wrote its moments"):
        fx.make_train_step(xent, donate=True)(state, classification_batch())
    with pytest.raises(DonatedError, match=DONATED):
        state.opt_state[0]
    kept = fx.TrainState.create(mlp(), tx, seed=0)  # not donated: nothing written, all readable
    with pytest.raises(ValueError, match="after Adam wrote its moments"):
        fx.make_train_step(xent, donate=False)(kept, classification_batch())
    assert int(kept.opt_state[0].count) == 0 and fx.tree_digest(kept)
