"""The logging callbacks inside fit, read back from real TensorBoard and JSONL files:
log_metrics, log_eval_metrics, log_hparams, model_watch, log_media, text_samples."""

import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TRACED, classification_batch, extra, graph_count, mlp, xent
from syncs import HostReads

import fxtrain as fx
from fxtrain.stats import gradient_histograms

X, Y = classification_batch(n=64, seed=1)


def read_tb(logdir):
    """The run in ``logdir`` read back with tensorboard's own reader (the clu extra's)."""
    event_accumulator = extra("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={
        "images": 0, "tensors": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalars_of(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def texts_of(acc, tag):
    name = next(t for t in acc.Tags()["tensors"] if t.startswith(tag))
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(name)]


def recorder(key="loss"):
    """A host callback that reads every step's ``key`` (tests only: it syncs every step)."""
    seen = {}

    def cb(state, event):
        if event.kind == "step_end":
            seen[event.step] = float(event.metrics[key])
    return cb, seen


def setup(dropout=0.0, grad_stats=False, compiled=False):
    state = fx.TrainState.create(mlp(dropout=dropout), fx.optim.adam(1e-2))
    step = fx.make_train_step(xent, grad_stats=grad_stats)
    return state, torch.compile(step, fullgraph=True, backend=TRACED) if compiled else step


def batches(shuffle=True):
    return fx.data.Batches((X, Y), 16, shuffle=shuffle, seed=0)


# ---- log_metrics --------------------------------------------------------------------------------

def test_log_metrics_writes_interval_means_and_eval_metrics(tmp_path):
    state, step = setup()
    rec, seen = recorder()
    writer = fx.logging.TensorBoardWriter(tmp_path)
    fx.fit(state, step, batches(), max_steps=12, callbacks=[rec, fx.callbacks.log_metrics(
        writer, every=5)], eval_step=fx.make_eval_step(xent), eval_data=[(X, Y)], eval_every=6)
    acc = read_tb(tmp_path)
    loss = scalars_of(acc, "train/loss")
    assert [s for s, _ in loss] == [5, 10, 12]  # the open interval is written at the end
    for (s, value), window in zip(loss, [range(1, 6), range(6, 11), range(11, 13)]):
        assert value == pytest.approx(np.mean([seen[i] for i in window]), rel=1e-6), s
    assert {"train/grad_norm", "train/accuracy", "train/learning_rate"} <= set(acc.Tags()["scalars"])
    assert [s for s, _ in scalars_of(acc, "eval/loss")] == [6, 12]
    assert not any(t.startswith("train/control") for t in acc.Tags()["scalars"])


def test_log_metrics_reads_the_device_only_when_an_interval_ends(tmp_path):
    data = batches()

    def run(callbacks):
        state, step = setup()  # fit donates the state it is given: a fresh one per run
        with HostReads() as mode:
            fx.fit(state, step, data, max_steps=100, callbacks=callbacks)
        return mode.reads

    baseline = run([])
    reads = run([fx.callbacks.log_metrics(fx.logging.TensorBoardWriter(tmp_path), every=50)])
    assert len(baseline) == 1 and len(reads) - len(baseline) == 2, (baseline, reads)
    assert [s for s, _ in scalars_of(read_tb(tmp_path), "train/loss")] == [50, 100]


def test_log_metrics_writes_when_another_callback_asks(tmp_path):
    state, step = setup()
    ask = lambda s, e: (s, fx.Control(log=e.kind == "step_end" and e.step == 3))  # noqa: E731
    writer = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    fx.fit(state, step, batches(), max_steps=10, callbacks=[
        ask, fx.callbacks.log_metrics(writer, every=5, eval_prefix=None)])
    steps = [e["step"] for e in fx.logging.read_jsonl(tmp_path / "m.jsonl")]
    assert steps == [4, 5, 10]


def test_log_metrics_after_a_resume_writes_what_the_uninterrupted_run_wrote(tmp_path):
    def run(directory, limits):
        writer = fx.logging.JsonlWriter(tmp_path / f"{directory}.jsonl")
        callbacks = [fx.callbacks.checkpoint_policy(every=6), fx.callbacks.log_metrics(writer, every=4)]
        with fx.checkpoint.CheckpointManager(tmp_path / directory, async_save=False) as mgr:
            for limit in limits:  # each fit call starts from the latest checkpoint
                state, step = setup(dropout=0.2)  # a fresh template: fit donates its state
                fx.fit(state, step, batches(), max_steps=limit, checkpoint=mgr,
                       callbacks=callbacks)
        writer.close()
        return [(e["step"], e["values"]) for e in fx.logging.read_jsonl(writer.path)]

    whole = run("whole", [10])
    split = run("split", [6, 10])
    assert [s for s, _ in whole] == [4, 6, 8, 10]  # 6: the open interval at the checkpoint
    assert split == whole


def test_log_metrics_warns_once_about_non_finite_values_and_writes_them(tmp_path):
    state, step = setup()
    bad = X.clone()
    bad[:16] = float("nan")
    writer = fx.logging.TensorBoardWriter(tmp_path)
    with pytest.warns(UserWarning, match="'train/loss' is nan") as record:
        fx.fit(state, step, fx.data.Batches((bad, Y), 16, shuffle=False), max_steps=8,
               callbacks=[fx.callbacks.log_metrics(writer, every=2)])
    assert sum("train/loss" in str(w.message) for w in record) == 1
    values = [v for _, v in scalars_of(read_tb(tmp_path), "train/loss")]
    assert len(values) == 4 and all(np.isnan(v) for v in values)  # NaN params from step 1 on


def test_log_metrics_bad_input():
    with pytest.raises(ValueError, match="every must be a positive int"):
        fx.callbacks.log_metrics(fx.logging.ConsoleWriter(), every=0)
    with pytest.raises(TypeError, match="has no write_scalars"):
        fx.callbacks.log_metrics(object())
    state = fx.TrainState.create(mlp(), fx.optim.sgd(0.1))

    def vector_aux(state, params, batch):
        loss, _ = xent(state, params, batch)
        return loss, {"per_example": torch.ones(3)}

    with pytest.raises(ValueError, match="'per_example' has shape \\(3,\\)"):
        fx.fit(state, fx.make_train_step(vector_aux), batches(), max_steps=2,
               callbacks=[fx.callbacks.log_metrics(fx.logging.ConsoleWriter(), every=2)])


# ---- log_eval_metrics -----------------------------------------------------------------------------

def test_log_eval_metrics_writes_scalars_per_class_values_and_matrices(tmp_path):
    torchmetrics = extra("torchmetrics")
    per_class = fx.metrics.from_torchmetrics(
        torchmetrics.classification.MulticlassAccuracy(num_classes=4, average=None))
    confusion = fx.metrics.from_torchmetrics(
        torchmetrics.classification.MulticlassConfusionMatrix(num_classes=4))

    def metrics_fn(state, params, batch):
        x, y = batch
        logits = state.apply(params, x)
        preds = logits.argmax(-1)
        return {"loss": F.cross_entropy(logits, y), "accuracy": per_class.from_model_output(
            preds, y), "confusion": confusion.from_model_output(preds, y)}

    state, step = setup()
    writer = fx.logging.TensorBoardWriter(tmp_path)
    with pytest.warns(UserWarning, match="'confusion' has shape \\(4, 4\\)"):
        final = fx.fit(state, step, batches(), max_steps=4, eval_step=fx.make_eval_step(
            metrics_fn), eval_data=[(X[:32], Y[:32]), (X[32:], Y[32:])], eval_every=4,
            callbacks=[fx.callbacks.log_metrics(writer, every=4),
                       fx.callbacks.log_eval_metrics(writer, prefix="val/")])
    acc = read_tb(tmp_path)
    preds = final.apply(final.params, X).argmax(-1)
    for c in range(4):
        expected = (preds[Y == c] == c).float().mean().item()
        assert scalars_of(acc, f"val/accuracy/{c}") == [(4, pytest.approx(expected))]
    ((_, table),) = texts_of(acc, "val/confusion")
    matrix = torch.zeros(4, 4)
    for t, p in zip(Y.tolist(), preds.tolist()):
        matrix[t, p] += 1
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert [[float(x) for x in r.split("|")[2:-1]] for r in rows] == matrix.tolist()
    (image,) = acc.Images("val/confusion")
    assert (image.step, image.width, image.height) == (4, 4, 4)
    assert scalars_of(acc, "eval/loss")[0][0] == 4  # log_metrics wrote the scalar ones


# ---- log_hparams ----------------------------------------------------------------------------------

def test_log_hparams_writes_the_config_and_archives_the_sources(tmp_path):
    code = tmp_path / "project"
    (code / "pkg").mkdir(parents=True)
    (code / "train.py").write_text("print('train')\n")
    (code / "pkg" / "model.py").write_text("MODEL = 1\n")
    (code / "config.yaml").write_text("lr: 0.1\n")
    (code / ".git").mkdir()
    (code / ".git" / "HEAD.py").write_text("hidden\n")
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "x.py").write_text("cache\n")
    (code / "data.bin").write_bytes(b"\0" * 10)
    (code / "huge.py").write_text("#" * (2 << 20))
    logdir = code / "runs" / "exp"  # logs inside the code folder are not archived
    writer = fx.logging.TensorBoardWriter(logdir)
    config = {"lr": 1e-2, "model": {"width": 16, "act": "relu"}, "tags": ["a", "b"],
              "device": torch.device("cpu"), "seed": torch.tensor(3)}
    state, step = setup()
    cb = fx.callbacks.log_hparams(writer, config, code_dir=code)
    state = fx.fit(state, step, batches(), max_steps=2, callbacks=[cb])
    fx.fit(state, step, batches(), max_steps=4, callbacks=[cb])  # a second start: a new archive
    writer.close()
    archives = sorted(p.name for p in logdir.glob("*.tar.gz"))
    assert archives == ["code-step0.tar.gz", "code-step2.tar.gz"]
    with tarfile.open(logdir / "code-step0.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["config.yaml", "pkg/model.py", "train.py"]
        assert tar.extractfile("pkg/model.py").read() == b"MODEL = 1\n"
    acc = read_tb(logdir)
    session = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    for expected in (b"model.width", b"model.act", b"relu", b"code-step0.tar.gz"):
        assert expected in session
    (_, table), _ = texts_of(acc, "config")
    assert '| tags | "[\\"a\\", \\"b\\"]" |' in table and "| seed | 3 |" in table


def test_log_hparams_bad_input(tmp_path):
    writer = fx.logging.ConsoleWriter()
    with pytest.raises(FileNotFoundError, match="code_dir .*missing is not a directory"):
        fx.callbacks.log_hparams(writer, {}, code_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot tell where ConsoleWriter writes"):
        fx.callbacks.log_hparams(writer, {}, code_dir=tmp_path)
    with pytest.raises(TypeError, match="config must be a mapping"):
        fx.callbacks.log_hparams(writer, [1, 2])
    cb = fx.callbacks.log_hparams(writer, {"a": 1}, code_dir=tmp_path, archive_dir=tmp_path / "z")
    state, step = setup()
    fx.fit(state, step, batches(), max_steps=1, callbacks=[cb])
    assert [p.name for p in (tmp_path / "z").iterdir()] == ["code-step0.tar.gz"]


# ---- model_watch ----------------------------------------------------------------------------------

def test_gradient_histograms_match_numpy():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    g[3], g[5] = float("nan"), float("inf")
    packed = gradient_histograms({"w": g}, bins=16)["grad_hist/w"]
    finite = g[torch.isfinite(g)].numpy()
    counts, edges = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    assert packed[0] == finite.min() and packed[1] == finite.max()
    assert packed[2:].tolist() == counts.tolist()
    h = fx.logging.Histogram.from_packed(packed)
    np.testing.assert_allclose(h.edges, edges, rtol=1e-5)  # numpy bins float32 data in float32
    assert h.moments()[0] == 998


def test_model_watch_writes_parameter_and_gradient_histograms_and_norms(tmp_path):
    state, step = setup(grad_stats="histograms")
    grads = {}

    def keep_norms(s, e):
        if e.kind == "step_end":
            grads[e.step] = {k: float(v) for k, v in e.metrics.items() if k.startswith("grad_norm/")}

    writer = fx.logging.TensorBoardWriter(tmp_path)
    final = fx.fit(state, step, batches(), max_steps=10, callbacks=[
        keep_norms, fx.callbacks.model_watch(writer, log="all", every=5)])
    writer.close()
    acc = read_tb(tmp_path)
    for name, p in final.params.items():
        (h5, h10) = acc.Histograms(f"parameters/{name}")
        assert (h5.step, h10.step) == (5, 10) and h10.histogram_value.num == p.numel()
        assert h10.histogram_value.min == pytest.approx(p.min().item())
        assert h10.histogram_value.max == pytest.approx(p.max().item())
        norm = scalars_of(acc, f"parameters/norm/{name}")
        assert norm[-1] == (10, pytest.approx(p.norm().item(), rel=1e-5))
        grad = acc.Histograms(f"gradients/{name}")
        assert [g.step for g in grad] == [5, 10] and grad[0].histogram_value.num == p.numel()
        assert scalars_of(acc, f"gradients/norm/{name}") == [
            (5, pytest.approx(grads[5][f"grad_norm/{name}"], rel=1e-5)),
            (10, pytest.approx(grads[10][f"grad_norm/{name}"], rel=1e-5))]


def test_gradient_histograms_compile_into_one_graph_without_recompiles():
    state, step = setup(grad_stats="histograms", compiled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(5):
            state, metrics = step(state, (X[16 * (i % 4):16 * (i % 4 + 1)], Y[16 * (i % 4):][:16]))
    assert graph_count() == 1
    assert metrics["grad_hist/0.weight"].shape == (66,) and metrics["grad_hist/0.weight"][2:].sum() == 128


def test_model_watch_without_gradient_histograms_warns_once_and_without_norms_fails(tmp_path):
    writer = fx.logging.JsonlWriter(tmp_path / "w.jsonl")
    state, step = setup(grad_stats=True)
    with pytest.warns(UserWarning, match="gradient norms only") as record:
        fx.fit(state, step, batches(), max_steps=4,
               callbacks=[fx.callbacks.model_watch(writer, every=2)])
    assert sum("norms only" in str(w.message) for w in record) == 1
    events = list(fx.logging.read_jsonl(tmp_path / "w.jsonl"))
    assert [(e["step"], e["kind"]) for e in events] == [(2, "scalars"), (4, "scalars")]
    state, step = setup()
    with pytest.raises(KeyError, match="grad_stats=True"):
        fx.fit(state, step, batches(), max_steps=2,
               callbacks=[fx.callbacks.model_watch(writer, every=2)])
    with pytest.raises(ValueError, match="log must be one of"):
        fx.callbacks.model_watch(writer, log="weights")


def test_model_watch_gives_foreign_writers_samples():
    class Plain:  # clu-shaped: bins raw values itself
        def __init__(self):
            self.hists = {}

        def write_scalars(self, step, mapping):
            pass

        def write_histograms(self, step, mapping, num_buckets=None):
            self.hists.update(mapping)

    writer = Plain()
    state, step = setup()
    final = fx.fit(state, step, batches(), max_steps=2,
                   callbacks=[fx.callbacks.model_watch(writer, log="parameters", every=2)])
    w = final.params["0.weight"]
    samples = writer.hists["parameters/0.weight"]
    assert isinstance(samples, np.ndarray) and len(samples) == w.numel()
    assert abs(samples.mean() - w.mean().item()) < (w.max() - w.min()).item() / 64


# ---- log_media and text_samples -----------------------------------------------------------------

def test_log_media_writes_each_kind_with_its_method(tmp_path):
    matplotlib = extra("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seen = {}

    def media(state):
        seen["training"], seen["grad"] = state.module.training, torch.is_grad_enabled()
        fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
        ax.plot([0, 1])
        logits = state.apply(state.params, X[:4])
        return {"grey": torch.rand(5, 7), "rgb": np.zeros((4, 6, 3), np.uint8),
                "video": torch.rand(2, 3, 4, 4, 3), "figure": fig, "note": "hello",
                "mean_logit": logits.mean(), "tone": fx.logging.Audio(np.zeros(800), 8000),
                "logits": fx.logging.Histogram(np.linspace(0, 1, 5), np.ones(4))}

    state, step = setup(dropout=0.5)
    writer = fx.logging.TensorBoardWriter(tmp_path)
    final = fx.fit(state, step, batches(), max_steps=4,
                   callbacks=[fx.callbacks.log_media(writer, media, every=2)])
    writer.close()
    assert seen == {"training": False, "grad": False} and final.module.training
    assert plt.get_fignums() == []  # figures are closed after drawing
    acc = read_tb(tmp_path)
    assert [(i.step, i.width, i.height) for i in acc.Images("grey")] == [(2, 7, 5), (4, 7, 5)]
    assert (acc.Images("figure")[0].width, acc.Images("figure")[0].height) == (100, 50)
    assert acc.Images("video")[0].encoded_image_string[:3] == b"GIF"
    assert [a.step for a in acc.Audio("tone")] == [2, 4]
    assert texts_of(acc, "note")[0] == (2, "hello")
    assert [s for s, _ in scalars_of(acc, "mean_logit")] == [2, 4]
    assert acc.Histograms("logits")[0].histogram_value.num == 4


def test_log_media_bad_values_name_the_key(tmp_path):
    writer = fx.logging.ConsoleWriter()
    for value, error, match in [(torch.zeros(5), ValueError, "'x' has shape \\(5,\\)"),
                                (object(), TypeError, "'x' is a object"),
                                (torch.zeros(2, 2, 5), ValueError, "'x' has 5 channels")]:
        state, step = setup()  # fit donated the last one before the callback raised
        with pytest.raises(error, match=match):
            fx.fit(state, step, batches(), max_steps=1, callbacks=[
                fx.callbacks.log_media(writer, lambda s, v=value: {"x": v}, every=1)])
    state, step = setup()
    with pytest.raises(TypeError, match="fn returned list"):
        fx.fit(state, step, batches(), max_steps=1,
               callbacks=[fx.callbacks.log_media(writer, lambda s: [1], every=1)])


TEXT = "the quick brown fox jumps over the lazy dog. "


class CharLM(torch.nn.Module):
    """Next character from the previous ``context`` characters: embeddings, then an MLP."""

    def __init__(self, vocab, context=6, width=64):
        super().__init__()
        self.context = context
        self.embed = torch.nn.Embedding(vocab, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16 * context, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, vocab))

    def forward(self, tokens):  # [B, context] -> [B, vocab]
        return self.mlp(self.embed(tokens).flatten(1))


def char_lm_example():
    """A character-level model that learns TEXT, and a sampler for text_samples."""
    chars = sorted(set(TEXT))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in TEXT * 4])
    torch.manual_seed(0)
    model = CharLM(len(chars))
    windows = ids.unfold(0, model.context + 1, 1)
    inputs, targets = windows[:, :-1].contiguous(), windows[:, -1].contiguous()

    def loss_fn(state, params, batch):
        x, y = batch
        return F.cross_entropy(state.apply(params, x), y)

    def generate(state, prompt, length=20, temperature=0.0):
        tokens = [index[c] for c in prompt]
        key = fx.random.step_key(state.rng, state.step)
        for i in range(length):
            context = torch.tensor([([index[" "]] * model.context + tokens)[-model.context:]])
            logits = state.apply(state.params, context)[0]
            if temperature == 0:
                tokens.append(int(logits.argmax()))
            else:
                tokens.append(int(fx.random.categorical(fx.random.fold_in(key, i),
                                                        logits / temperature)))
        return "".join(chars[t] for t in tokens[len(prompt):])

    state = fx.TrainState.create(model, fx.optim.adam(3e-2))
    data = fx.data.Batches((inputs, targets), 32, seed=0)
    return state, fx.make_train_step(loss_fn), data, generate


def test_text_samples_on_a_character_level_model(tmp_path):
    state, step, data, generate = char_lm_example()
    writer = fx.logging.TensorBoardWriter(tmp_path)
    prompts = ["the quick", "over the"]
    final = fx.fit(state, step, data, max_steps=150, callbacks=[
        fx.callbacks.text_samples(writer, generate, prompts, every=50)])
    writer.close()
    acc = read_tb(tmp_path)
    first, second = texts_of(acc, "samples/0"), texts_of(acc, "samples/1")
    assert [s for s, _ in first] == [50, 100, 150]
    assert all(t.startswith("the quick") and len(t) == 29 for _, t in first)
    # trained, the model continues each prompt with the text it learned
    assert first[-1][1] == (TEXT * 2)[:29] and second[-1][1] == (TEXT * 2)[TEXT.index("over"):][:28]
    assert generate(final, "the quick") == first[-1][1][len("the quick"):]
    # sampled with the state's key: the same state draws the same text
    assert generate(final, "the", temperature=1.0) == generate(final, "the", temperature=1.0)


def test_text_samples_bad_input():
    writer = fx.logging.ConsoleWriter()
    with pytest.raises(ValueError, match="non-empty list of str"):
        fx.callbacks.text_samples(writer, lambda s, p: p, [])
    state, step = setup()
    with pytest.raises(TypeError, match="returned int for prompt 'a'"):
        fx.fit(state, step, batches(), max_steps=1, callbacks=[
            fx.callbacks.text_samples(writer, lambda s, p: 3, ["a"], every=1)])


# ---- all writing callbacks are rank-zero only ----------------------------------------------------

def test_logging_callbacks_write_nothing_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(fx.distributed, "rank", lambda: 1)
    writer = fx.logging.JsonlWriter(tmp_path / "w.jsonl")
    state, step = setup(grad_stats=True)
    fx.fit(state, step, batches(), max_steps=4, eval_step=fx.make_eval_step(xent),
           eval_data=[(X, Y)], eval_every=2, callbacks=[
               fx.callbacks.log_metrics(writer, every=2), fx.callbacks.log_eval_metrics(writer),
               fx.callbacks.log_hparams(writer, {"a": 1}, code_dir=tmp_path),
               fx.callbacks.model_watch(writer, log="all", every=2),
               fx.callbacks.log_media(writer, lambda s: {"t": "x"}, every=2),
               fx.callbacks.text_samples(writer, lambda s, p: "x", ["p"], every=2)])
    assert (tmp_path / "w.jsonl").read_text() == ""
    assert not list(tmp_path.glob("*.tar.gz"))
