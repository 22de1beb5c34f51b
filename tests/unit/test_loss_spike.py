"""loss_spike: the rule against a plain-Python reference, no false positive on smooth or noisy
decreasing losses, each action (a skip restores the step's old values bit-exactly), one graph
inside a compiled step, and its state through a checkpoint."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxtrain as fx
from fxtrain.callbacks import fold
from helpers import TRACED, classification_batch, graph_count, mlp, xent


def host_flags(cb, losses):
    """Folds ``cb`` over step_end events with the given losses; the spike flag of each step."""
    state = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    flags = []
    for i, loss in enumerate(losses, start=1):
        state, _ = fold([cb], state, fx.Event("step_end", i, 0, {"loss": torch.tensor(loss)}))
        flags.append(bool(state.callbacks[cb.name].flagged))
    return flags, state


def reference_flags(losses, window, threshold, min_rise):
    """The documented rule in plain Python: a window of the last accepted losses."""
    kept, flags = [], []
    for loss in losses:
        recent = kept[-window:]
        if not math.isfinite(loss):
            spike = True
        elif len(recent) < window:
            spike = False
        else:
            mean, std = statistics.fmean(recent), statistics.pstdev(recent)
            spike = loss - mean > threshold * std and loss - mean > min_rise * abs(mean)
        flags.append(spike)
        if not spike:
            kept.append(loss)
    return flags


@settings(max_examples=40, deadline=None)
@given(losses=st.lists(st.one_of(st.floats(0.0, 3.0, width=32), st.just(float("nan")),
                                 st.sampled_from([10.0, 50.0])), min_size=1, max_size=40),
       window=st.integers(2, 6), threshold=st.sampled_from([0.0, 1.0, 3.0]),
       min_rise=st.sampled_from([0.0, 0.1, 0.5]))
def test_flags_match_the_documented_rule(losses, window, threshold, min_rise):
    cb = fx.callbacks.loss_spike(window=window, threshold=threshold, min_rise=min_rise)
    flags, state = host_flags(cb, losses)
    assert flags == reference_flags(losses, window, threshold, min_rise)
    assert int(state.callbacks["loss_spike"].spikes) == sum(flags)


def test_a_planted_spike_is_flagged_and_kept_out_of_the_window():
    losses = [1.0, 1.02, 0.98, 1.01, 0.99] * 4 + [3.0, 1.0, 3.0, 0.99]
    flags, state = host_flags(fx.callbacks.loss_spike(window=10), losses)
    assert [i for i, f in enumerate(flags) if f] == [20, 22]  # both spikes: the first one
    assert 3.0 not in state.callbacks["loss_spike"].window.tolist()  # did not widen the window


def test_no_false_positive_on_smooth_or_noisy_decreasing_losses():
    t = torch.arange(2000, dtype=torch.float64)
    smooth = (2.0 * torch.exp(-t / 300) + 0.1).tolist()
    g = torch.Generator().manual_seed(0)
    noisy = (torch.tensor(smooth) * (1 + 0.05 * torch.randn(2000, generator=g,
                                                           dtype=torch.float64))).tolist()
    for losses in (smooth, noisy):
        flags, _ = host_flags(fx.callbacks.loss_spike(), losses)
        assert not any(flags)


def test_min_rise_spares_small_bumps_of_a_very_smooth_loss():
    flat = [1.0 + 1e-6 * (i % 3) for i in range(20)]
    bump = flat + [1.01, 1.2]  # 10 000 std above, but 1 % above the mean; then 20 %
    flags, _ = host_flags(fx.callbacks.loss_spike(window=10), bump)
    assert [i for i, f in enumerate(flags) if f] == [21]
    flags, _ = host_flags(fx.callbacks.loss_spike(window=10, min_rise=0.0), bump)
    assert [i for i, f in enumerate(flags) if f] == [20, 21]


def test_no_false_positive_while_a_real_model_trains():
    cb = fx.callbacks.loss_spike(window=20, action="skip")
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    step = fx.make_train_step(xent, callbacks=[cb])
    batches = [classification_batch(seed=i % 8) for i in range(80)]
    for batch in batches:
        state, _ = step(state, batch)
    assert int(state.callbacks["loss_spike"].spikes) == 0


def spiky_batches():
    """Ten ordinary batches, then one whose inputs are 1000x larger (its loss jumps)."""
    x, y = classification_batch()
    return [(x, y)] * 10 + [(1000 * x, y), (x, y)]


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_skip_and_stop_restore_the_step_bit_exactly_inside_a_compiled_step(action):
    cb = fx.callbacks.loss_spike(window=5, action=action)
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    step = torch.compile(fx.make_train_step(xent, callbacks=[cb]), fullgraph=True, backend=TRACED)
    batches = spiky_batches()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches[:10]:
            state, metrics = step(state, batch)
        assert not bool(metrics["control/stop"])
        before = state
        state, metrics = step(state, batches[10])
    assert graph_count() == 1
    assert bool(state.callbacks["loss_spike"].flagged) and int(state.step) == 11
    assert fx.tree_digest(state.params) == fx.tree_digest(before.params)
    assert fx.tree_digest(state.opt_state) == fx.tree_digest(before.opt_state)
    assert bool(metrics["control/stop"]) == (action == "stop")


def test_log_keeps_the_update_and_asks_to_log():
    cb = fx.callbacks.loss_spike(window=5)  # action="log"
    state = fx.TrainState.create(mlp(), fx.optim.adam(1e-2), callbacks=[cb])
    step = fx.make_train_step(xent, callbacks=[cb])
    batches = spiky_batches()
    for batch in batches[:10]:
        state, metrics = step(state, batch)
    assert not bool(metrics["control/log"])
    before = state.params
    state, metrics = step(state, batches[10])
    assert bool(metrics["control/log"]) and not bool(metrics["control/stop"])
    assert fx.tree_digest(state.params) != fx.tree_digest(before)  # the update went through


def test_skip_on_the_host_in_fit_and_max_skips_stops():
    cb = fx.callbacks.loss_spike(window=5, action="skip", max_skips=2)
    x, y = classification_batch()
    data = [(x, y)] * 8 + [(1000 * x, y), (x, y), (1000 * x, y)] + [(x, y)] * 5
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    state = fx.fit(state, fx.make_train_step(xent), data, callbacks=[cb], max_epochs=1,
                   sync_every=1)
    spike = state.callbacks["loss_spike"]
    assert int(spike.spikes) == 2 and int(state.step) == 11  # stopped at the second skip


def test_state_goes_through_a_checkpoint_and_decides_the_same(tmp_path):
    cb = fx.callbacks.loss_spike(window=4)
    losses = [1.0, 1.1, 0.9, 1.0, 1.05]
    _, state = host_flags(cb, losses)
    fx.checkpoint.save(tmp_path / "ckpt", state)
    like = fx.callbacks.init([cb], fx.TrainState.create(mlp(), fx.optim.sgd(0.1)))
    restored = fx.checkpoint.restore(tmp_path / "ckpt", like=like)
    assert fx.tree_digest(restored) == fx.tree_digest(state)
    for s in (state, restored):
        s, _ = fold([cb], s, fx.Event("step_end", 6, 0, {"loss": torch.tensor(2.0)}))
        assert bool(s.callbacks["loss_spike"].flagged)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 1}, "window must be an int >= 2"),
    ({"threshold": -1.0}, "threshold and min_rise must be finite"),
    ({"action": "warn"}, "action must be one of"),
    ({"max_skips": 3}, "max_skips needs action='skip'")])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fx.callbacks.loss_spike(**kwargs)
