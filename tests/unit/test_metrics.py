import optree
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import TRACED, classification_batch, extra, graph_count, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtrain as fx
import fxtrain.metrics as M
from fxtrain import struct

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
batch = st.lists(floats, min_size=0, max_size=6)
batches = st.lists(batch, min_size=1, max_size=5)
SCALAR_METRICS = [M.Average, M.Std, M.LastValue, M.Accuracy]


def leaves(value):
    return pytree.tree_flatten(value)[0]


def assert_same(a, b, exact=False):
    assert type(a) is type(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if exact:
            assert torch.equal(x, y), (a, b)
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3, equal_nan=True)


def value_of(cls, values):
    if cls is M.Accuracy:  # 0/1 correctness from the sign of each value
        v = torch.tensor(values)
        labels = torch.zeros(len(values), dtype=torch.long)
        return cls.from_model_output(torch.stack([v, -v], -1), labels)
    return cls.from_model_output(torch.tensor(values, dtype=torch.float32))


def merge_all(values):
    out = values[0]
    for v in values[1:]:
        out = out.merge(v)
    return out


# ---- laws -------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches)
def test_merging_batches_equals_computing_on_the_concatenation(data):
    flat = torch.tensor([x for b in data for x in b], dtype=torch.float64)
    mean = flat.sum() / len(flat)
    for cls, expected in [(M.Average, mean), (M.Std, ((flat - mean) ** 2).mean().sqrt())]:
        got = merge_all([cls.empty()] + [value_of(cls, b) for b in data]).compute()
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-2, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(floats, st.booleans()), min_size=1, max_size=12), st.integers(1, 4))
def test_masked_accuracy_over_batches_equals_accuracy_of_the_concatenation(rows, parts):
    logits = torch.tensor([[x, -x] for x, _ in rows])
    labels = torch.zeros(len(rows), dtype=torch.long)
    mask = torch.tensor([m for _, m in rows])
    chunks = zip(logits.tensor_split(parts), labels.tensor_split(parts), mask.tensor_split(parts))
    merged = merge_all([M.Accuracy.from_model_output(lg, lb, mask=m) for lg, lb, m in chunks])
    correct = (logits.argmax(-1) == labels)[mask].float()
    torch.testing.assert_close(merged.compute(), correct.mean(), equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCALAR_METRICS), batch, batch, batch)
def test_merge_is_associative(cls, a, b, c):
    a, b, c = (value_of(cls, v) for v in (a, b, c))
    assert_same(a.merge(b).merge(c), a.merge(b.merge(c)), exact=cls in (M.LastValue, M.Accuracy))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([M.Average, M.Std, M.Accuracy]), batch, batch)
def test_merge_is_commutative_for_sums(cls, a, b):
    a, b = value_of(cls, a), value_of(cls, b)
    assert_same(a.merge(b), b.merge(a), exact=cls is not M.Std)  # a + b == b + a in floats


@settings(max_examples=60, deadline=None)
@given(batch, batch)
def test_last_value_keeps_the_latest_non_empty_batch(a, b):
    merged = value_of(M.LastValue, a).merge(value_of(M.LastValue, b))
    latest = b or a
    expected = torch.tensor(latest).mean() if latest else torch.tensor(float("nan"))
    torch.testing.assert_close(merged.compute(), expected, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCALAR_METRICS), batch)
def test_empty_is_an_identity_for_merge(cls, values):
    x = value_of(cls, values)
    assert_same(cls.empty().merge(x), x, exact=True)
    assert_same(x.merge(cls.empty()), x, exact=True)


# ---- structure --------------------------------------------------------------------------------

def collection_class():
    return M.Collection.create(
        loss=M.Average.from_output("loss"), accuracy=M.Accuracy,
        spread=M.Std.from_output("loss"), last=M.LastValue.from_output("loss"))


def outputs(seed=0, n=6):
    x, y = classification_batch(n=n, seed=seed)
    logits = mlp()(x).detach()
    return dict(loss=F.cross_entropy(logits, y, reduction="none"), logits=logits, labels=y)


@pytest.mark.parametrize("cls", SCALAR_METRICS + ["collection"])
def test_empty_has_the_structure_and_dtypes_of_a_real_value(cls):
    cls = collection_class() if cls == "collection" else cls
    real = cls.from_model_output(values=torch.rand(5), **outputs())
    empty = cls.empty()
    assert pytree.tree_structure(empty) == pytree.tree_structure(real)
    assert [(t.dtype, t.shape) for t in leaves(empty)] == [(t.dtype, t.shape) for t in leaves(real)]
    assert isinstance(real, M.Metric) and isinstance(empty, M.Metric)


def test_accumulators_are_float32_or_float64_and_counts_int64():
    half = M.Std.from_model_output(torch.rand(4, dtype=torch.bfloat16))
    double = M.Average.from_model_output(torch.rand(4, dtype=torch.float64))
    assert half.mean.dtype == torch.float32 and half.count.dtype == torch.int64
    assert double.total.dtype == torch.float64
    assert M.Average.empty(dtype=torch.float64).total.dtype == torch.float64
    assert M.Average.empty().compute().isnan()


def test_dynamic_classes_are_cached_pytrees_for_torch_and_optree():
    Metrics = collection_class()
    assert Metrics is collection_class()
    assert M.Average.from_output("a") is M.Average.from_output("a")
    value = Metrics.single_from_model_output(**outputs())
    flat, spec = pytree.tree_flatten(value)
    assert len(flat) == 9
    assert pytree.tree_unflatten(flat, spec).compute().keys() == value.compute().keys()
    flat2, spec2 = optree.tree_flatten(value, namespace=struct.OPTREE_NAMESPACE)
    assert len(flat2) == 9 and type(optree.tree_unflatten(spec2, flat2)) is Metrics


def test_from_output_passes_the_mask_but_drops_it_for_batch_level_values():
    Loss = M.Average.from_output("loss")
    mask = torch.tensor([True, False, True])
    per_example = Loss.from_model_output(loss=torch.tensor([1.0, 100.0, 3.0]), mask=mask)
    assert per_example.compute() == 2.0 and per_example.count == 2
    batch_level = Loss.from_model_output(loss=torch.tensor(5.0), mask=mask)
    assert batch_level.compute() == 5.0 and batch_level.count == 1


def test_mask_may_be_a_prefix_of_the_values_shape():
    values = torch.tensor([[1.0, 2.0], [30.0, 40.0]])
    assert M.Average.from_model_output(values, mask=torch.tensor([1, 0])).compute() == 1.5
    elementwise = torch.tensor([[1, 0], [0, 1]])
    assert M.Average.from_model_output(values, mask=elementwise).compute() == 20.5


# ---- compiled eval ----------------------------------------------------------------------------

def test_compiled_eval_returns_collections_with_one_graph_and_no_recompiles():
    Metrics, model = collection_class(), mlp()

    @torch.compile(fullgraph=True, backend=TRACED)
    def eval_step(x, y, mask):
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        return Metrics.single_from_model_output(loss=loss, logits=logits, labels=y, mask=mask)

    @torch.compile(fullgraph=True, backend=TRACED)
    def accumulate(totals, x, y, mask):
        return totals.merge(eval_step(x, y, mask))

    data = [(*classification_batch(n=8, seed=s), torch.arange(8) % 3 != 0) for s in range(5)]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        merged, inside = Metrics.empty(), Metrics.empty()
        for x, y, m in data:
            merged = merged.merge(eval_step(x, y, m))
            inside = accumulate(inside, x, y, m)
    assert graph_count() == 2  # eval_step once, accumulate once
    with torch.no_grad():
        x, y, m = (torch.cat(t) for t in zip(*data))
        logits = model(x)
        expected = Metrics.single_from_model_output(
            loss=F.cross_entropy(logits, y, reduction="none"), logits=logits, labels=y, mask=m)
    for got in (merged.compute(), inside.compute()):
        assert got.keys() == expected.compute().keys()
        for name in ("loss", "accuracy", "spread"):
            torch.testing.assert_close(got[name], expected.compute()[name])
    last = data[-1]
    last_loss = F.cross_entropy(model(last[0]), last[1], reduction="none")[last[2]].mean()
    torch.testing.assert_close(merged.compute()["last"], last_loss)


# ---- torchmetrics -----------------------------------------------------------------------------

@pytest.fixture
def torchmetrics():
    return extra("torchmetrics")


def spread_state_class(torchmetrics):
    class SpreadState(torchmetrics.Metric):
        """A test metric with mean, min, max and cat states."""

        full_state_update = False

        def __init__(self):
            super().__init__()
            self.add_state("avg", torch.tensor(0.0), dist_reduce_fx="mean")
            self.add_state("low", torch.tensor(float("inf")), dist_reduce_fx="min")
            self.add_state("high", torch.tensor(float("-inf")), dist_reduce_fx="max")
            self.add_state("seen", [], dist_reduce_fx="cat")

        def update(self, preds, target):
            diff = (preds - target).float()
            self.avg = diff.mean()
            self.low = torch.minimum(self.low, diff.min())
            self.high = torch.maximum(self.high, diff.max())
            self.seen.append(diff)

        def compute(self):
            return torch.stack([self.avg, self.low, self.high, torch.cat(self.seen).sum()])

    return SpreadState


@pytest.mark.parametrize("make", [
    lambda tm: tm.classification.MulticlassAccuracy(num_classes=4),
    lambda tm: tm.classification.MulticlassAccuracy(num_classes=4, average="micro"),
    lambda tm: tm.MeanSquaredError(),
    lambda tm: tm.classification.BinaryAUROC(),  # list ("cat") states
])
def test_torchmetrics_adapter_matches_torchmetrics(make, torchmetrics):
    Adapted, reference = M.from_torchmetrics(make(torchmetrics)), make(torchmetrics)
    total = Adapted.empty()
    for seed in range(4):
        logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(7) % 4
        inputs = {"MulticlassAccuracy": (logits, labels),
                  "MeanSquaredError": (logits[:, 0], labels.float()),
                  "BinaryAUROC": (logits[:, 0].sigmoid(), labels % 2)}
        preds, target = inputs[type(reference).__name__]
        reference.update(preds, target)
        total = total.merge(Adapted.from_model_output(preds, target))
    assert isinstance(total, M.Metric)
    torch.testing.assert_close(total.compute(), reference.compute())


def test_torchmetrics_adapter_merges_mean_min_max_and_cat_states(torchmetrics):
    Adapted = M.from_torchmetrics(spread_state_class(torchmetrics)())
    parts = [Adapted.from_model_output(torch.tensor(p), torch.zeros(len(p)))
             for p in ([1.0, 3.0], [-2.0], [4.0, 4.0, 7.0])]
    got = merge_all([Adapted.empty()] + parts).compute()
    means = torch.tensor([2.0, -2.0, 5.0]).mean()  # mean state: average over updates
    expected = torch.stack([means, torch.tensor(-2.0), torch.tensor(7.0), torch.tensor(17.0)])
    torch.testing.assert_close(got, expected)


def test_torchmetrics_adapter_applies_the_mask(torchmetrics):
    Adapted = M.from_torchmetrics(torchmetrics.MeanSquaredError())
    mask = torch.tensor([True, False])
    value = Adapted.from_model_output(torch.tensor([1.0, 9.0]), torch.zeros(2), mask=mask)
    assert value.compute() == 1.0


def test_torchmetrics_adapter_errors(torchmetrics):
    with pytest.raises(TypeError, match="expected a torchmetrics.Metric"):
        M.from_torchmetrics(torch.nn.Linear(1, 1))

    class Stacked(spread_state_class(torchmetrics)):
        def __init__(self):
            super().__init__()
            self.add_state("odd", torch.tensor(0.0), dist_reduce_fx=None)

    with pytest.raises(ValueError, match="state 'odd'.*sum, mean, max, min and cat"):
        M.from_torchmetrics(Stacked())

    class Growing(torchmetrics.Metric):
        def __init__(self):
            super().__init__()
            self.add_state("seen", torch.zeros(0), dist_reduce_fx="sum")

        def update(self, preds, target):
            self.seen = preds - target

        def compute(self):
            return self.seen.sum()

    with pytest.raises(ValueError, match=r"changed state 'seen' from \(0,\).*fixed states"):
        M.from_torchmetrics(Growing()).from_model_output(torch.ones(3), torch.zeros(3))
    one = M.from_torchmetrics(torchmetrics.MeanSquaredError())
    other = M.from_torchmetrics(torchmetrics.MeanSquaredError())
    with pytest.raises(TypeError, match="cannot merge"):
        one.empty().merge(other.empty())


def _torchmetrics_inputs(name, logits, labels):
    """The (preds, target) that torchmetrics metric ``name`` takes, from a classifier's output."""
    return {"MulticlassAccuracy": (logits, labels),
            "MeanSquaredError": (logits[:, 0], labels.float()),
            "BinaryF1Score": (logits[:, 0], labels % 2),  # logits: torchmetrics applies sigmoid
            "MeanMetric": (logits[:, 0], (labels + 1).float()),  # values and weights
            "BinaryAUROC": (logits[:, 0].sigmoid(), labels % 2)}[name]


@pytest.mark.parametrize("make", [
    lambda tm: tm.classification.MulticlassAccuracy(num_classes=4),
    lambda tm: tm.MeanSquaredError(),
    lambda tm: tm.classification.BinaryF1Score(),
    lambda tm: tm.MeanMetric(),
    lambda tm: tm.classification.BinaryAUROC(thresholds=8),  # binned: fixed-size states
], ids=["multiclass_accuracy", "mse", "binary_f1", "mean", "binned_auroc"])
def test_torchmetrics_adapter_in_a_compiled_eval_step_equals_torchmetrics(make, torchmetrics):
    Adapted, reference = M.from_torchmetrics(make(torchmetrics)), make(torchmetrics)
    name = type(reference).__name__

    def metrics_fn(state, batch):
        x, y, mask = batch
        preds, target = _torchmetrics_inputs(name, state.apply(state.params, x), y)
        return {"metric": Adapted.from_model_output(preds, target, mask=mask)}

    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))
    data = [(*classification_batch(n=9, seed=s), torch.arange(9) % 3 != s % 3) for s in range(4)]
    eval_step = torch.compile(fx.make_eval_step(metrics_fn), fullgraph=True, backend=TRACED)
    merge = torch.compile(lambda total, value: total.merge(value), fullgraph=True,
                          backend=TRACED)
    with torch._dynamo.config.patch(error_on_recompile=True):
        evaluated = fx.evaluate(eval_step, state, data)
        assert graph_count() == 1
        total = Adapted.empty()
        for batch in data:
            total = merge(total, eval_step(state, batch)["metric"])
    assert graph_count() == 2
    with torch.no_grad():
        for x, y, mask in data:
            preds, target = _torchmetrics_inputs(name, state.apply(state.params, x), y)
            reference.update(preds[mask], target[mask])
    expected = reference.compute()
    assert torch.equal(evaluated["metric"], expected) and torch.equal(total.compute(), expected)


def test_torchmetrics_list_states_are_refused_inside_a_compiled_step(torchmetrics):
    Adapted = M.from_torchmetrics(torchmetrics.classification.BinaryAUROC())
    preds, target = torch.rand(6, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 2
    step = torch.compile(lambda p, t: Adapted.from_model_output(p, t), fullgraph=True,
                         backend=TRACED)
    with pytest.raises(Exception, match=r"list states \['preds', 'target'\].*thresholds=N"):
        step(preds, target)
    reference = torchmetrics.classification.BinaryAUROC()
    reference.update(preds, target)
    assert torch.equal(Adapted.from_model_output(preds, target).compute(), reference.compute())


# ---- bad input --------------------------------------------------------------------------------

def test_merging_different_metric_types_is_a_type_error():
    avg = M.Average.from_model_output(torch.ones(2))
    for other in (M.Std.empty(), M.Accuracy.empty(), M.Average.from_output("loss").empty()):
        with pytest.raises(TypeError, match=r"cannot merge Average with .*same metric class"):
            avg.merge(other)
    with pytest.raises(TypeError, match="cannot merge"):
        collection_class().empty().merge(M.Collection.create(loss=M.Average).empty())


def test_bad_shapes_and_dtypes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not match .* values \(2, 2\)"):
        M.Average.from_model_output(torch.ones(2, 2), mask=torch.ones(3))
    with pytest.raises(ValueError, match="mask of shape"):
        M.Std.from_model_output(torch.ones(4), mask=torch.ones(4, 1))
    with pytest.raises(ValueError, match="mask of shape"):
        M.Accuracy.from_model_output(torch.ones(4, 3), torch.zeros(4, dtype=torch.long),
                                     mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"logits \(4, 3\) must be labels' shape \(5,\)"):
        M.Accuracy.from_model_output(torch.ones(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class ids, got torch.float32"):
        M.Accuracy.from_model_output(torch.ones(4, 3), torch.zeros(4))
    with pytest.raises(KeyError, match="no model output named 'loss'"):
        M.Average.from_output("loss").from_model_output(logits=torch.ones(1))


def test_collection_create_rejects_bad_fields():
    with pytest.raises(TypeError, match="not a Metric class"):
        M.Collection.create(loss=torch.nn.Linear)
    with pytest.raises(TypeError, match="not a Metric class"):
        M.Collection.create(loss=M.Average.empty())
    with pytest.raises(ValueError, match="not a usable field name"):
        M.Collection.create(**{"my loss": M.Average})


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), max_size=30),
       st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_confusion_matrix_counts_pairs_over_masked_batches(rows, parts):
    """Merged over any split into batches, counts[i, j] is the number of unmasked examples of
    class i predicted as j."""
    Confusion = M.ConfusionMatrix.for_classes(4)
    expected = torch.zeros(4, 4)
    for true, pred, keep in rows:
        expected[true, pred] += keep
    total = Confusion.empty()
    for part in range(parts):
        chunk = rows[part::parts]
        labels = torch.tensor([t for t, _, _ in chunk], dtype=torch.int64)
        logits = torch.nn.functional.one_hot(torch.tensor([p for _, p, _ in chunk],
                                                          dtype=torch.int64), 4).float()
        mask = torch.tensor([k for _, _, k in chunk], dtype=torch.bool)
        total = total.merge(Confusion.from_model_output(logits.reshape(-1, 4), labels, mask=mask))
    assert torch.equal(total.compute(), expected)


def test_confusion_matrix_in_a_compiled_collection_and_its_errors():
    Metrics = M.Collection.create(accuracy=M.Accuracy,
                                  confusion=M.ConfusionMatrix.for_classes(4))
    assert M.ConfusionMatrix.for_classes(4) is M.ConfusionMatrix.for_classes(4)
    x, y = classification_batch(n=16)
    model = mlp()
    step = torch.compile(lambda x, y: Metrics.single_from_model_output(logits=model(x), labels=y),
                         fullgraph=True, backend=TRACED)
    with torch.no_grad():
        out = step(x, y).merge(Metrics.empty()).compute()
    counts = out["confusion"]
    assert counts.shape == (4, 4) and counts.sum() == 16
    assert float(counts.trace() / 16) == pytest.approx(float(out["accuracy"]))
    with pytest.raises(TypeError, match="for_classes"):
        M.ConfusionMatrix.empty()
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        M.ConfusionMatrix.for_classes(1)
    with pytest.raises(ValueError, match="class dimension of 3"):
        M.ConfusionMatrix.for_classes(3).from_model_output(torch.zeros(4, 10), torch.zeros(4).long())
    with pytest.raises(TypeError, match="integer class ids"):
        M.ConfusionMatrix.for_classes(3).from_model_output(torch.zeros(4, 3), torch.zeros(4))


def test_metric_values_of_factory_made_classes_pickle_as_the_same_class():
    """Evaluation under torch.distributed sends metric values between ranks with pickle."""
    import pickle
    Loss = M.Average.from_output("loss")
    Confusion = M.ConfusionMatrix.for_classes(4)
    Metrics = M.Collection.create(loss=Loss, accuracy=M.Accuracy, confusion=Confusion)
    x, y = classification_batch(n=8)
    logits = mlp()(x).detach()
    value = Metrics.single_from_model_output(loss=torch.tensor(0.5), logits=logits, labels=y)
    back = pickle.loads(pickle.dumps(value))
    assert type(back) is Metrics and type(back.loss) is Loss and type(back.confusion) is Confusion
    assert_same(back.merge(value), value.merge(value), exact=True)


class SummedLoss(M.Average.from_output("loss")):
    """A user's subclass of a factory-made metric (clu's pattern): pickles as itself."""

    def compute(self):
        return self.total


def test_a_subclass_of_a_factory_made_metric_pickles_as_the_subclass():
    import pickle
    value = SummedLoss.from_model_output(loss=torch.tensor([1.0, 3.0]))
    back = pickle.loads(pickle.dumps(value))
    assert type(back) is SummedLoss and float(back.compute()) == 4.0
