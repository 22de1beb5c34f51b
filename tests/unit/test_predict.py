"""``fx.predict``: outputs for every example in order, eval mode, one graph, across ranks, and
clear errors for outputs it cannot gather."""

import pytest
import torch
import torch.nn.functional as F

import dist_worker
import fxtrain as fx
from helpers import mlp

X = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))


def make_state(dropout=0.0):
    return fx.TrainState.create(mlp((8, 16, 3), dropout=dropout), fx.optim.sgd(0.1), seed=0)


def batches(x, size, **kw):
    return fx.data.Batches(x, size, shuffle=False, drop_last=False, **kw)


def test_outputs_cover_every_example_in_order_in_the_structure_returned():
    state = make_state()
    out = fx.predict(lambda s, x: (s.apply(s.params, x), {"first": x[:, 0]}), state,
                     batches(X, 16))  # 16, 16, 16 and 2
    logits, extra = out
    torch.testing.assert_close(logits, state.apply(state.params, X))
    assert torch.equal(extra["first"], X[:, 0])


def test_the_model_runs_in_eval_mode_without_gradients_and_is_left_as_it_was():
    state = make_state(dropout=0.5)
    seen = []

    def predict_fn(s, x):
        seen.append((s.module.training, torch.is_grad_enabled()))
        return s.apply(s.params, x)

    a = fx.predict(predict_fn, state, batches(X, 25))
    b = fx.predict(predict_fn, state, batches(X, 25))
    assert seen == [(False, False)] * 4 and state.module.training
    assert torch.equal(a, b)  # dropout off: the same outputs twice
    assert not a.requires_grad


def test_a_compiled_predict_fn_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    state = make_state()
    calls = []

    def predict_fn(s, x):
        return F.softmax(s.apply(s.params, x), -1)

    counting = torch.compile(predict_fn, fullgraph=True, backend=_counting(calls))
    out = fx.predict(counting, state, fx.data.Batches(X[:48], 16, shuffle=False))
    assert len(calls) == 1  # three batches of one shape: one graph, no recompile
    torch.testing.assert_close(out, predict_fn(state, X[:48]))


def _counting(calls):
    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward
    return backend


def test_callbacks_get_one_predict_end_event():
    events = []
    state = make_state()
    fx.predict(lambda s, x: s.apply(s.params, x), state, batches(X, 16),
               callbacks=[lambda s, e: events.append((e.kind, e.metrics))])
    assert events == [("predict_end", {"batches": 4})]


def test_bad_outputs_are_named():
    state = make_state()
    with pytest.raises(TypeError, match=r"returned a str at \['label'\] for batch 0"):
        fx.predict(lambda s, x: {"label": "cat"}, state, batches(X, 16))
    with pytest.raises(ValueError, match=r"has shape \(\), but the batch has 16 examples"):
        fx.predict(lambda s, x: s.apply(s.params, x).mean(), state, batches(X, 16))
    with pytest.raises(TypeError, match="returned no tensors"):
        fx.predict(lambda s, x: {}, state, batches(X, 16))
    flip = iter([True, False, True, False])
    with pytest.raises(ValueError, match="batch 1's outputs have structure"):
        fx.predict(lambda s, x: {"a": x} if next(flip) else {"b": x}, state, batches(X, 16))
    with pytest.raises(ValueError, match="yielded no batches"):
        fx.predict(lambda s, x: x, state, [])


def test_outputs_gathered_across_ranks_come_back_in_one_process_order(monkeypatch):
    """Two ranks faked in one process: each predicts its shard, the gather interleaves them."""
    state = make_state()
    predict_fn = lambda s, x: x[:, :2]  # noqa: E731
    shards = [batches(X[:45], 4, shard=(r, 2)) for r in (0, 1)]  # rank 1's last share is empty
    sent = []
    monkeypatch.setattr(fx.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fx.distributed, "all_gather", lambda obj: sent.append(obj) or [obj])
    fx.predict(predict_fn, state, shards[1])  # rank 1: what it sends
    monkeypatch.setattr(fx.distributed, "all_gather", lambda obj: [obj, sent[0]])
    merged = fx.predict(predict_fn, state, shards[0])  # rank 0, gathering both
    assert torch.equal(merged, X[:45, :2])
