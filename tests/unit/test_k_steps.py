"""K steps per call: ``make_train_step(..., steps_per_call=K)`` takes K stacked batches and
equals K single steps, in one graph; ``fit`` feeds it K batches per call and sees call
boundaries only."""

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import classification_batch, graph_count, mlp, xent

import fxtrain as fx
from fxtrain.donation import DonatedError

K = 4
X = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def _state(callbacks=(), dropout=0.1):
    return fx.TrainState.create(mlp((8, 16, 4), dropout=dropout),
                                fx.optim.adamw(1e-2, weight_decay=1e-2), seed=0,
                                callbacks=callbacks)


def _stack(batches):
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *batches)


def _save_at_6(state, event):  # an in-step request in the middle of the second call
    return state, fx.Control(save=event.step == 6)


def _in_step_callbacks():
    return [fx.callbacks.early_stopping("loss", patience=2, event="step_end", restore_best=True),
            fx.callbacks.nan_guard("skip"), fx.callbacks.ema(0.9), _save_at_6]


def _batches(n):
    out = [classification_batch(seed=i) for i in range(n)]
    out[5] = (torch.full_like(out[5][0], float("nan")), out[5][1])  # skipped by nan_guard
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_k_step_calls_equal_single_steps(compiled):
    """Dropout (keyed per inner step), a skipped inner step (nan_guard), early stopping that
    restores the best parameters, and a flag raised mid-call: 3 calls of 4 steps give the
    state of 12 single steps, and each call's flags are the OR of its steps' flags."""
    cbs = _in_step_callbacks()
    batches = _batches(3 * K)
    single = fx.make_train_step(xent, callbacks=cbs)
    multi = fx.make_train_step(xent, callbacks=cbs, steps_per_call=K)
    if compiled:  # both: eager, AdamW runs fused (fxtrain.optim.fused), with other roundings
        multi = torch.compile(multi, fullgraph=True, backend="eager")
        single = torch.compile(single, fullgraph=True, backend="eager")
    ref, saves = _state(cbs), []
    for batch in batches:
        ref, last = single(ref, batch)
        saves.append(bool(last["control/save"]))
    state, call_saves = _state(cbs), []
    for c in range(3):
        state, metrics = multi(state, _stack(batches[c * K:(c + 1) * K]))
        call_saves.append(bool(metrics["control/save"]))
    assert fx.tree_digest(state) == fx.tree_digest(ref)
    assert int(state.step) == 3 * K and int(state.callbacks["nan_guard"].skipped) == 1
    assert bool(state.callbacks["early_stopping"].stopped)  # the restore path was taken
    assert saves.index(True) == 5 and call_saves == [False, True, False]
    assert metrics.keys() == last.keys()
    assert all(torch.equal(metrics[k], last[k]) for k in last if not k.startswith("control/"))


def test_a_compiled_k_step_call_is_one_graph_that_never_recompiles():
    cbs = _in_step_callbacks()
    step = torch.compile(fx.make_train_step(xent, callbacks=cbs, steps_per_call=K),
                         fullgraph=True, backend="eager")
    state = _state(cbs)
    for c in range(4):
        with torch._dynamo.config.patch(error_on_recompile=c > 0):
            state, _ = step(state, _stack([classification_batch(seed=c * K + i)
                                           for i in range(K)]))
    assert graph_count() == 1 and int(state.step) == 4 * K


def tick(state, event):
    del state, event


def _recorder(log):
    def cb(state, event):
        if event.kind in ("step_end", "eval_end"):
            log.append((event.kind, event.step))
    return cb


def _fit(step, max_steps, log=None, **kw):
    cbs = [fx.callbacks.nan_guard("skip"), fx.callbacks.ema(0.9)]
    train_step = torch.compile(fx.make_train_step(xent, callbacks=cbs, **step), fullgraph=True,
                               backend="eager")
    return fx.fit(kw.pop("state", None) or _state(cbs), train_step,
                  fx.data.Batches((X, Y), 16, seed=3), max_steps=max_steps, sync_every=5,
                  eval_step=fx.make_eval_step(xent), eval_every=8,
                  eval_data=fx.data.Batches((X, Y), 64, shuffle=False),
                  callbacks=[_recorder(log if log is not None else [])], **kw)


def test_fit_with_k_steps_equals_fit_with_single_steps_and_resumes_exactly(tmp_path):
    """8 batches per epoch, K=4: fit's state (data position and callback states included)
    equals single steps; host callbacks see step_end at call ends only; a run resumed from a
    checkpoint at a call boundary equals the uninterrupted one."""
    log, ref_log = [], []
    ref = _fit({}, 24, ref_log)
    end = _fit({"steps_per_call": K}, 24, log)
    assert fx.tree_digest(end) == fx.tree_digest(ref)
    assert int(end.step) == 24 and int(end.data.epoch) == 3 and int(end.data.index) == 0
    assert [s for k, s in log if k == "step_end"] == list(range(K, 25, K))
    assert [s for k, s in log if k == "eval_end"] == [8, 16, 24] == \
        [s for k, s in ref_log if k == "eval_end"]
    manager = fx.checkpoint.CheckpointManager(tmp_path, async_save=False)
    _fit({"steps_per_call": K}, 12, checkpoint=manager)
    resumed = _fit({"steps_per_call": K}, 24, checkpoint=manager)  # from step 12's checkpoint
    assert fx.tree_digest(resumed) == fx.tree_digest(end)


def test_bad_combinations_get_clear_errors():
    step = fx.make_train_step(xent, steps_per_call=K)
    data = fx.data.Batches((X, Y), 16)  # 8 batches per epoch

    def fit(data=data, state=None, **kw):
        return fx.fit(state or _state(), step, data, **{"max_steps": 8, **kw})

    def named(label, value):
        return rf"{label} is {value}, not a multiple of the step's steps_per_call=4"

    with pytest.raises(ValueError, match=named("max_steps", 10)):
        fit(max_steps=10)
    with pytest.raises(ValueError, match=named("eval_every", 6)):
        fit(eval_every=6, eval_step=fx.make_eval_step(xent), eval_data=data)
    with pytest.raises(ValueError, match=named("steps_per_epoch", 6)):
        fit(data=fx.data.Batches(classification_batch(n=96, features=8), 16))
    with pytest.raises(ValueError, match=named("the period of host callback tick", 6)):
        fit(callbacks=[fx.callbacks.every(6, tick)])
    with pytest.raises(ValueError, match=named("the period of host callback checkpoint", 10)):
        fit(callbacks=[fx.callbacks.checkpoint_policy(every=10)])
    two = fx.fit(_state(), fx.make_train_step(xent), data, max_steps=2)
    with pytest.raises(ValueError, match=named(r"the start step \(state.step\)", 2)):
        fit(state=two)
    with pytest.raises(ValueError, match="host callback early_stopping may skip a step"):
        fit(callbacks=[fx.callbacks.early_stopping("loss", event="step_end")])
    six = [classification_batch(seed=i) for i in range(6)]  # no length: found when it happens
    with pytest.raises(ValueError, match="epoch of the data ended after batch 2 of a call of "
                                         "steps_per_call=4"):
        fit(data=iter(six))
    with pytest.raises(ValueError, match=r"takes 4 stacked batches.*\[0\] has shape \(16, 8\)"):
        step(_state(), classification_batch())
    with pytest.raises(ValueError, match="steps_per_call must be a positive int, got 0"):
        fx.make_train_step(xent, steps_per_call=0)


def _storage(state):
    leaves = pytree.tree_leaves((state.step, state.params, state.buffers, state.opt_state))
    return [t.data_ptr() for t in leaves if isinstance(t, torch.Tensor)]


def test_k_steps_donate_like_a_single_step():
    """donate=True: the state after K steps is written into the given state's storage and the
    given state refuses further use; under fit (donate=None) likewise."""
    cbs = _in_step_callbacks()
    batches = _stack(_batches(2 * K)[K:])  # the second call: with the NaN batch
    expected, _ = torch.compile(fx.make_train_step(xent, callbacks=cbs, steps_per_call=K),
                                fullgraph=True, backend="eager")(_state(cbs), batches)
    step = torch.compile(fx.make_train_step(xent, callbacks=cbs, steps_per_call=K, donate=True),
                         fullgraph=True, backend="eager")
    old = _state(cbs)
    storage = _storage(old)
    new, _ = step(old, batches)
    assert fx.tree_digest(new) == fx.tree_digest(expected)
    assert _storage(new) == storage
    with pytest.raises(DonatedError, match="donated to a train step"):
        old.params["0.weight"]
    start = _state()
    storage = _storage(start)
    end = fx.fit(start, fx.make_train_step(xent, steps_per_call=K), fx.data.Batches((X, Y), 16),
                 max_steps=8)
    assert _storage(end) == storage and int(end.step) == 8
    with pytest.raises(DonatedError, match="donated to a train step"):
        start.params["0.weight"]


def test_fit_with_k_steps_reads_in_step_flags_at_the_call_passing_sync_every():
    """sync_every=5, K=4, 16 batches per epoch: a stop raised at step 6 is read at the end of
    the call that passes step 5 (step 8), not at the next multiple of 5 that is a call end (20)
    or the epoch end (16); the steps after the stop were skipped inside the step."""
    def stop_at_6(state, event):
        return state, fx.Control(stop=event.step >= 6, skip=event.step > 6)

    step = fx.make_train_step(xent, callbacks=[stop_at_6], steps_per_call=K)
    data = fx.data.Batches((X, Y), 8)
    end = fx.fit(_state([stop_at_6], dropout=0.0), step, data, max_steps=64, sync_every=5)
    assert int(end.step) == 8
    ref = fx.fit(_state(dropout=0.0), fx.make_train_step(xent), data, max_steps=6)
    assert all(torch.equal(end.params[k], ref.params[k]) for k in ref.params)


def test_k_batches_from_any_stream_stack_in_order_in_their_structure():
    """What fit gives a step of steps_per_call=K from a stream without next_stacked (a list of
    batches): each leaf stacked along a new first dimension, batch i at index i."""
    from fxtrain.step import _k_steps

    batches = [(torch.full((2, 3), float(i)), torch.full((2,), i)) for i in range(4)]
    got = _k_steps.stacked(batches)
    assert type(got) is tuple and [int(v) for v in got[1][:, 0]] == [0, 1, 2, 3]
    assert torch.equal(got[0], torch.stack([b[0] for b in batches]))
    as_dicts = _k_steps.stacked([{"x": x, "y": y} for x, y in batches])
    assert list(as_dicts) == ["x", "y"] and torch.equal(as_dicts["y"], got[1])
    nested = _k_steps.stacked([((x,), y) for x, y in batches])  # torch's pytree: same order
    assert torch.equal(nested[0][0], got[0]) and torch.equal(nested[1], got[1])
    data = fx.data.as_stream(batches)
    stacked, _, done = _k_steps.take(data, data.init(), 4)
    assert torch.equal(stacked[0], got[0]) and done


def test_an_epoch_resumed_on_another_layout_that_ends_inside_a_call_says_so():
    """3 batches of 3 taken (9 examples of 16), then resumed with batches of 2 (drop_last): the 7
    left are 3 batches, so the epoch ends after the first batch of the second 2-step call."""
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    state = fx.fit(state, fx.make_train_step(xent), fx.data.Batches((x, y), 3, seed=0),
                   max_steps=3)
    two = fx.make_train_step(xent, steps_per_call=2, donate=False)  # the state is used twice
    state = state.replace(step=torch.tensor(4))  # a start at a multiple of 2
    with pytest.raises(ValueError, match=r"ended after batch 1 of a call of steps_per_call=2.*"
                                         r"an epoch resumed on another batch size"):
        fx.fit(state, two, fx.data.Batches((x, y), 2, seed=0), max_steps=10)
    with pytest.raises(ValueError, match=r"batch 2 of a call of steps_per_call=2 has shapes "
                                         r"\[\(3, 8\), \(3,\)\], the first \[\(4, 8\), \(4,\)\].*"
                                         r"drop_last=True"):  # 7 left: 4, then a short 3
        fx.fit(state, two, fx.data.Batches((x, y), 4, seed=0, drop_last=False), max_steps=8)
