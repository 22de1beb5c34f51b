"""fx.logging writers: TensorBoard files read back with tensorboard's own reader, JSONL lines,
console lines, and the wrapping writers."""

import json
import logging
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import extra, reaped

import fxtrain as fx
from helpers_logging import read_tensorboard


def test_tensorboard_scalars_images_histograms_texts_hparams_read_back(tmp_path):
    w = fx.logging.TensorBoardWriter(tmp_path / "tb")
    w.write_scalars(1, {"loss": torch.tensor(0.5), "lr": 1e-3})
    w.write_scalars(3, {"loss": np.float32(0.25)})
    w.write_images(3, {"grid": torch.rand(2, 8, 6, 3), "one": np.zeros((5, 4, 1), np.uint8)})
    w.write_histograms(3, {"w": torch.randn(1000)}, num_buckets=10)
    w.write_texts(4, {"sample": "hello fxtrain"})
    w.write_hparams({"lr": 1e-3, "layers": 2, "act": "relu"})
    w.close()
    acc = read_tensorboard(tmp_path / "tb")
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, 0.5), (3, 0.25)]
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)
    (grid,) = acc.Images("grid")  # the batch tiled into one image, side by side
    assert (grid.step, grid.width, grid.height) == (3, 12, 8)
    assert (acc.Images("one")[0].width, acc.Images("one")[0].height) == (4, 5)
    histo = acc.Histograms("w")[0]
    assert histo.step == 3 and histo.histogram_value.num == 1000
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("sample") for t in tags)
    text = acc.Tensors(next(t for t in tags if t.startswith("sample")))[0]
    assert b"hello fxtrain" in text.tensor_proto.string_val[0]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and b"relu" in plugins["_hparams_/session_start_info"]


def test_tensorboard_figures_audio_and_config(tmp_path):
    matplotlib = extra("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    w = fx.logging.TensorBoardWriter(tmp_path)
    w.write_images(7, {"curve": fig})
    w.write_audios(7, {"tone": torch.sin(torch.arange(800) / 5.0)}, sample_rate=8000)
    w.write_config({"lr": 0.01, "model": {"width": 64}})
    w.write_videos(8, {"clip": torch.rand(1, 5, 6, 7, 3)})
    with pytest.raises(ValueError, match="video 'bad' has shape"):
        w.write_videos(8, {"bad": torch.rand(5, 6, 7, 3)})
    w.close()
    plt.close(fig)
    acc = read_tensorboard(tmp_path)
    assert acc.Images("curve")[0].step == 7
    assert acc.Audio("tone")[0].sample_rate == 8000
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])
    (clip,) = acc.Images("clip")
    assert (clip.step, clip.width, clip.height) == (8, 7, 6)
    assert clip.encoded_image_string.startswith(b"GIF")


def test_bad_images_and_scalars_name_the_key(tmp_path):
    w = fx.logging.TensorBoardWriter(tmp_path)
    with pytest.raises(ValueError, match="image 'x' has shape \\(4, 4\\)"):
        w.write_images(0, {"x": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="image 'x' has 5 channels"):
        w.write_images(0, {"x": torch.zeros(4, 4, 5)})
    with pytest.raises(ValueError, match="scalar 'v' has shape \\(3,\\)"):
        w.write_scalars(0, {"v": torch.zeros(3)})
    with pytest.warns(UserWarning, match="logged scalar 'bad_loss' is nan"):
        w.write_scalars(1, {"bad_loss": float("nan")})
    w.close()
    assert np.isnan(read_tensorboard(tmp_path).Scalars("bad_loss")[0].value)  # written, not dropped
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot create the log directory"):
        fx.logging.TensorBoardWriter(tmp_path / "file" / "tb")


def test_jsonl_lines_and_reader(tmp_path):
    w = fx.logging.JsonlWriter(tmp_path / "logs" / "m.jsonl")
    with pytest.warns(UserWarning, match="'inf' is inf"):
        w.write_scalars(2, {"loss": torch.tensor(0.5), "inf": float("inf")})
    w.write_texts(2, {"s": "hi"})
    w.write_images(2, {"img": torch.zeros(3, 3, 1)})
    w.write_hparams({"lr": 0.1, "obj": object})
    w.close()
    events = list(fx.logging.read_jsonl(tmp_path / "logs" / "m.jsonl"))
    assert [e["kind"] for e in events] == ["scalars", "texts", "images", "hparams"]
    assert events[0]["step"] == 2 and events[0]["values"] == {"loss": 0.5, "inf": "inf"}
    assert events[2]["values"]["img"]["shape"] == [1, 3, 3, 1]


def test_console_writer_lines(caplog):
    w = fx.logging.ConsoleWriter()
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        w.write_scalars(5, {"loss": 0.25, "acc": torch.tensor(0.5)})
        w.write_texts(5, {"sample": "abc"})
    assert "step 5 | loss=0.25 | acc=0.5" in caplog.text and "step 5 | sample: abc" in caplog.text


class Recorder:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __getattr__(self, name):
        if not name.startswith(("write_", "flush", "close")):
            raise AttributeError(name)

        def record(*args, **kwargs):
            if name == self.fail_on:
                raise OSError("disk gone")
            self.calls.append((name, args))
        return record


def test_multi_and_async_writers():
    a, b = Recorder(), Recorder()
    w = fx.logging.AsyncWriter(fx.logging.MultiWriter([a, b]))
    for step in range(20):
        w.write_scalars(step, {"x": step})
    w.write_audios(3, {"a": np.zeros(4)}, sample_rate=16000)
    w.flush()
    assert [c[1][0] for c in a.calls if c[0] == "write_scalars"] == list(range(20))
    assert a.calls == b.calls
    w.close()
    assert a.calls[-1][0] == "close"
    bad = fx.logging.AsyncWriter(Recorder(fail_on="write_texts"))
    bad.write_texts(0, {"t": "x"})
    with pytest.raises(RuntimeError, match="writing with Recorder failed: disk gone"):
        bad.flush()
    bad.close()


def test_jsonl_writer_reopened_after_a_torn_line_cuts_it_and_appends_cleanly(tmp_path):
    path = tmp_path / "m.jsonl"
    w = fx.logging.JsonlWriter(path)
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    with open(path, "a") as f:
        f.write('{"step": 2, "time": 1, "ki')  # a process killed mid-write
    with pytest.warns(UserWarning, match="incomplete line"):
        w = fx.logging.JsonlWriter(path)
    w.write_scalars(2, {"loss": 0.5})
    w.close()
    assert [e["step"] for e in fx.logging.read_jsonl(path)] == [1, 2]


def test_every_writer_takes_a_matplotlib_figure_as_an_image(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1])
    jsonl = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    for writer in (fx.logging.ConsoleWriter(), jsonl, fx.logging.TensorBoardWriter(tmp_path)):
        writer.write_images(1, {"fig": fig})
    jsonl.close()
    (event,) = fx.logging.read_jsonl(tmp_path / "m.jsonl")
    assert event["values"]["fig"]["shape"] == [1, 50, 100, 3]


def test_csv_writer_appends_rows_that_read_back_and_survive_a_torn_line(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    writer = fx.logging.CsvWriter(path)
    writer.write_scalars(1, {"loss": torch.tensor(0.5), "lr": 1e-3})
    writer.write_scalars(2, {"loss": float("nan")})
    writer.write_texts(2, {"sample": "a, \"quoted\"\nline"})
    writer.write_images(2, {"x": torch.zeros(4, 4, 1)})  # no place in a table: skipped
    writer.write_hparams({"lr": 1e-3, "model": "mlp"})
    writer.close()
    with open(path, "a") as f:
        f.write("3,17.0,loss,0.2")  # a writer killed mid-row
    with pytest.warns(UserWarning, match="CsvWriter: .* incomplete line"):
        again = fx.logging.CsvWriter(path)  # a resumed run appends
    again.write_scalars(3, {"loss": 0.25})
    again.close()
    got = fx.logging.read_csv(path)
    assert got["lr"] == [(1, 1e-3)] and got["loss"][0] == (1, 0.5) and got["loss"][2] == (3, 0.25)
    assert math.isnan(got["loss"][1][1]) and got["sample"] == [(2, "a, \"quoted\"\nline")]
    assert set(got) == {"loss", "lr", "sample"}
    assert json.loads((path.parent / "hparams.json").read_text()) == {"lr": 1e-3, "model": "mlp"}


def test_mlflow_writer_is_read_back_with_mlflows_own_client(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    writer = fx.logging.MlflowWriter(str(store), experiment="fx", run_name="first")
    writer.write_scalars(10, {"loss": torch.tensor(0.5), "accuracy": 0.75})
    writer.write_scalars(20, {"loss": 0.25})
    writer.write_hparams({"lr": 3e-4, "layers": [64, 64]})
    writer.write_texts(20, {"sample": "hello"})
    writer.write_images(20, {"digit": torch.rand(2, 8, 8, 1)})
    writer.write_audios(20, {"tone": torch.zeros(1, 800)}, sample_rate=8000)
    writer.close()
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(writer.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert [(m.step, m.value) for m in client.get_metric_history(writer.run_id, "loss")] == \
        [(10, 0.5), (20, 0.25)]
    assert run.data.params == {"lr": "0.0003", "layers": "[64, 64]"}
    artifacts = {a.path for a in client.list_artifacts(writer.run_id, "texts/sample")}
    assert artifacts == {"texts/sample/step_20.txt"}
    assert client.list_artifacts(writer.run_id, "audio/tone")
    experiment = client.get_experiment_by_name("fx")
    assert experiment is not None and experiment.experiment_id == run.info.experiment_id
    again = fx.logging.MlflowWriter(str(store), experiment="fx")  # the same experiment, a new run
    assert again.run_id != writer.run_id
    again.close()
    del mlflow


def test_each_writer_warns_once_per_non_finite_key_of_its_own(tmp_path):
    """No process-wide table of warned keys: a second writer (another run in the same
    process, a notebook's next cell) warns about a key an earlier one warned about; each
    warns once per key."""
    for i in range(2):
        writer = fx.logging.JsonlWriter(tmp_path / f"{i}.jsonl")
        with pytest.warns(UserWarning, match="'loss' is nan") as record:
            writer.write_scalars(1, {"loss": float("nan")})
            writer.write_scalars(2, {"loss": float("nan")})
        assert sum("'loss'" in str(w.message) for w in record) == 1
        writer.close()
