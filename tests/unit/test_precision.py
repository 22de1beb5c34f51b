"""Mixed precision policies on the step: autocast with float32 master weights, dynamic loss
scaling whose state is in the TrainState, bf16 parameters; all inside one compiled graph."""

import pytest
import torch
import torch.nn.functional as F

import fxtrain as fx
from helpers import classification_batch, graph_count, mlp, xent

pytestmark = pytest.mark.compat  # run on every torch of the range too (.ci/run)

BATCH = classification_batch(n=32)


def _state(model=None, callbacks=()):
    return fx.TrainState.create(model or mlp((8, 16, 4)), fx.optim.adamw(1e-2), seed=0,
                                callbacks=callbacks)


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="'32', 'bf16-mixed', '16-mixed', 'bf16-true'"):
        fx.make_train_step(xent, precision="fp16")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_mixed_computes_in_bf16_and_keeps_float32_masters(compiled):
    seen = []

    def loss_fn(state, params, batch):
        logits = state.apply(params, batch[0])
        seen.append(logits.dtype)
        return F.cross_entropy(logits, batch[1])

    step = fx.make_train_step(loss_fn, precision="bf16-mixed")
    full = fx.make_train_step(loss_fn)
    if compiled:
        step = torch.compile(step, fullgraph=True)
    new, metrics = step(_state(), BATCH)
    ref, ref_metrics = full(_state(), BATCH)
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32
    assert metrics["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in new.params.values())
    torch.testing.assert_close(metrics["loss"], ref_metrics["loss"], rtol=2e-2, atol=2e-2)
    assert not torch.equal(metrics["loss"], ref_metrics["loss"])  # it did compute in bf16
    for k in new.params:
        torch.testing.assert_close(new.params[k], ref.params[k], rtol=0, atol=2e-2)


def test_16_mixed_scales_the_loss_and_unscales_the_gradients():
    """A step's update equals the float32 step's (up to float16 rounding): the gradients reach
    the optimizer unscaled, and the scale is in the state and the metrics."""
    step = fx.make_train_step(xent, precision="16-mixed", grad_stats=True)
    state = _state(callbacks=[fx.precision.loss_scale(init_scale=1024.0)])
    new, metrics = step(state, BATCH)
    ref, ref_metrics = fx.make_train_step(xent, grad_stats=True)(_state(), BATCH)
    assert float(metrics["loss_scale"]) == 1024.0
    torch.testing.assert_close(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-2,
                               atol=1e-3)
    for k in new.params:
        torch.testing.assert_close(new.params[k], ref.params[k], rtol=0, atol=1e-3)
    scale = new.callbacks["loss_scale"]
    assert float(scale.scale) == 1024.0 and int(scale.good_steps) == 1 and int(scale.skipped) == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_16_mixed_skips_non_finite_steps_backs_off_and_grows(compiled):
    step = fx.make_train_step(xent, precision="16-mixed")
    if compiled:
        step = torch.compile(step, fullgraph=True, backend="eager")
    state = _state(callbacks=[fx.precision.loss_scale(init_scale=8.0, growth_interval=2)])
    bad = (torch.full_like(BATCH[0], float("inf")), BATCH[1])
    before = state.params
    state, metrics = step(state, bad)  # non-finite: skipped, scale halved
    assert all(torch.equal(state.params[k], before[k]) for k in before)
    ls = state.callbacks["loss_scale"]
    assert (float(ls.scale), int(ls.good_steps), int(ls.skipped)) == (4.0, 0, 1)
    assert int(state.step) == 1
    state, _ = step(state, BATCH)
    state, _ = step(state, BATCH)  # two finite steps in a row: the scale doubles
    ls = state.callbacks["loss_scale"]
    assert (float(ls.scale), int(ls.good_steps), int(ls.skipped)) == (8.0, 0, 1)
    assert not all(torch.equal(state.params[k], before[k]) for k in before)


def test_16_mixed_under_fit_creates_its_state_and_checkpoints_it(tmp_path):
    step = torch.compile(fx.make_train_step(xent, precision="16-mixed"), fullgraph=True,
                         backend="eager")
    data = fx.data.Batches(classification_batch(n=128), 32)
    seen = {}

    def plan(state, event):
        if event.kind == "train_begin":
            seen.update(event.metrics)

    state = fx.fit(_state(), step, data, max_steps=4, callbacks=[plan])
    assert seen["precision"] == "16-mixed"
    assert int(state.callbacks["loss_scale"].good_steps) == 4
    fx.checkpoint.save(tmp_path / "ckpt", state)
    restored = fx.checkpoint.restore(tmp_path / "ckpt", like=state)
    assert fx.tree_digest(restored.callbacks) == fx.tree_digest(state.callbacks)
    with pytest.raises(KeyError, match="no callback state named 'loss_scale'"):
        fx.make_train_step(xent, precision="16-mixed")(_state(), BATCH)  # own loop: create it


def test_bf16_true_trains_bf16_parameters_and_refuses_float32():
    step = fx.make_train_step(xent, precision="bf16-true")
    with pytest.raises(ValueError, match=r"bf16-true.*model.to\(torch.bfloat16\)"):
        step(_state(), BATCH)
    state = _state(mlp((8, 16, 4)).to(torch.bfloat16))
    x, y = BATCH
    bf16_step = fx.make_train_step(xent, precision="bf16-true")
    new, metrics = bf16_step(state, (x.to(torch.bfloat16), y))
    assert all(p.dtype == torch.bfloat16 for p in new.params.values())
    assert torch.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="keeps float32 master parameters"):
        fx.make_train_step(xent, precision="bf16-mixed")(state, (x.to(torch.bfloat16), y))


def test_mixed_steps_compile_into_one_graph():
    for precision in ("bf16-mixed", "16-mixed"):
        before = graph_count()
        step = torch.compile(fx.make_train_step(xent, precision=precision), fullgraph=True,
                             backend="eager")
        state = _state(callbacks=[fx.precision.loss_scale()])
        for _ in range(3):
            state, _ = step(state, BATCH)
        assert graph_count() - before == 1, precision


def test_a_16_mixed_step_owns_its_loss_scale_apart_from_its_callbacks():
    """The loss scale is a StepState the step's spec lists apart from its in-step callbacks (a
    generator of callbacks too): fx.fit creates it, and no fold calls it."""
    guard = fx.callbacks.nan_guard()
    step = fx.make_train_step(lambda s, p, b: s.apply(p, b).square().mean(),
                              callbacks=(cb for cb in [guard, fx.precision.loss_scale(8.0)]),
                              precision="16-mixed")
    spec = fx.step_spec(step)
    assert spec.in_step_callbacks == (guard,)
    assert [s.name for s in spec.step_states] == ["loss_scale"]
    state = fx.fit(fx.TrainState.create(torch.nn.Linear(2, 1), fx.optim.sgd(0.1)), step,
                   [torch.randn(4, 2)] * 2, max_epochs=1)
    assert int(state.callbacks["loss_scale"].good_steps) == 2
    assert float(state.callbacks["loss_scale"].scale) == 8.0


def test_the_loss_scale_has_its_own_keyword_and_callbacks_stays_its_alias():
    """``loss_scale=`` and the older ``callbacks=[loss_scale(...)]`` build the same step; two
    scales, a scale on a step that scales nothing, or something else as the scale are refused."""
    guard = fx.callbacks.nan_guard()
    by_keyword = fx.make_train_step(xent, precision="16-mixed", callbacks=[guard],
                                    loss_scale=fx.precision.loss_scale(init_scale=8.0))
    by_alias = fx.make_train_step(xent, precision="16-mixed",
                                  callbacks=[guard, fx.precision.loss_scale(init_scale=8.0)])
    for step in (by_keyword, by_alias):
        spec = fx.step_spec(step)
        assert spec.in_step_callbacks == (guard,)
        assert [s.name for s in spec.step_states] == ["loss_scale"]
    state = fx.callbacks.init([*fx.step_spec(by_keyword).step_states, guard], _state())
    assert float(state.callbacks["loss_scale"].scale) == 8.0  # the given settings, not 2**16
    a, b = by_keyword(state, BATCH)[0], by_alias(state, BATCH)[0]
    assert fx.tree_digest(a) == fx.tree_digest(b)
    with pytest.raises(ValueError, match="2 loss scales were given.*loss_scale= and callbacks="):
        fx.make_train_step(xent, precision="16-mixed", loss_scale=fx.precision.loss_scale(),
                           callbacks=[fx.precision.loss_scale()])
    with pytest.raises(ValueError, match="a loss scale is for precision='16-mixed'.*'bf16-mixed'"):
        fx.make_train_step(xent, precision="bf16-mixed", loss_scale=fx.precision.loss_scale())
    with pytest.raises(TypeError, match=r"loss_scale must be fx.precision.loss_scale\(...\)"):
        fx.make_train_step(xent, precision="16-mixed", loss_scale=1024.0)
    with pytest.warns(UserWarning, match="the loss scale in callbacks= is unused"):
        step = fx.make_train_step(xent, precision="bf16-mixed",
                                  callbacks=[fx.precision.loss_scale()])  # the alias: as before
    assert [s.name for s in fx.step_spec(step).step_states] == ["loss_scale"]


def test_a_step_state_of_another_name_stays_the_steps_beside_the_loss_scale():
    """Only a ``StepState`` named loss_scale is the loss scale: another is kept as the step's
    own state on any precision, and a "16-mixed" step still owns its default scale."""
    mine = fx.callbacks.StepState("mine", init=lambda state: torch.tensor(0))
    assert fx.step_spec(fx.make_train_step(xent, callbacks=[mine])).step_states == (mine,)
    step = fx.make_train_step(xent, precision="16-mixed", callbacks=[mine])
    assert [s.name for s in fx.step_spec(step).step_states] == ["loss_scale", "mine"]
    state = fx.callbacks.init(fx.step_spec(step).step_states, _state())
    new, metrics = step(state, BATCH)
    assert float(metrics["loss_scale"]) == 2.0**16 and int(new.callbacks["mine"]) == 0


@pytest.mark.parametrize("forced, precision", [("1", "bf16-mixed"), ("0", "32")])
def test_the_demo_s_bfloat16_choice_is_forced_either_way_on_any_machine(monkeypatch, forced,
                                                                         precision):
    """FXTRAIN_NATIVE_BF16 forces the machine-dependent branch (the suite runs the bfloat16
    one on machines without native bfloat16); anything but 1 or 0 is refused by name."""
    from fxtrain.apps.demo import tasks
    monkeypatch.setenv("FXTRAIN_NATIVE_BF16", forced)
    assert tasks.native_bf16() is (forced == "1")
    assert tasks.make_task("transformer", 0).precision == precision
    monkeypatch.setenv("FXTRAIN_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match="FXTRAIN_NATIVE_BF16 must be 1 or 0"):
        tasks.native_bf16()
