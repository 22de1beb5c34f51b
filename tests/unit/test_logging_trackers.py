"""CometWriter and NeptuneWriter offline, read back with each client's own reader: Comet's
offline archive through comet_ml's message classes, Neptune's offline run through its disk
queue and operation classes. No test reaches the network (every connect is refused and
recorded), and the API key or token set in the environment appears nowhere they write."""

import json
import socket
import threading
import zipfile

import numpy as np
import pytest
import torch
from helpers import extra

import fxtrain as fx

SECRET = "fxtrain-test-secret-0123456789abcdef"


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt, refused and recorded: the test asserts there were none."""
    tried = []

    def refuse(self, address, *args):
        tried.append(address)
        raise OSError(f"the test refuses a connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


@pytest.fixture
def comet(tmp_path, monkeypatch, no_network):
    # comet_ml reads these when imported (conftest.py sets them for the suite's processes)
    for name, value in (("COMET_DISABLE_AUTO_LOGGING", "1"), ("COMET_DISABLE_ANNOUNCEMENT", "1"),
                        ("COMET_ERROR_TRACKING_ENABLE", "false"), ("COMET_API_KEY", SECRET)):
        monkeypatch.setenv(name, value)
    extra("comet_ml")
    yield dict(online=False, offline_directory=str(tmp_path / "comet"), log_code=False,
               log_graph=False, parse_args=False, auto_output_logging=False,
               log_env_details=False, log_git_metadata=False, log_git_patch=False,
               auto_param_logging=False, auto_metric_logging=False, display_summary_level=0)
    assert not no_network


@pytest.fixture
def neptune(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("NEPTUNE_API_TOKEN", SECRET)
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    extra("neptune")
    yield dict(mode="offline", capture_stdout=False, capture_stderr=False,
               capture_hardware_metrics=False, capture_traceback=False, git_ref=False,
               source_files=[], dependencies=None)
    assert not no_network


def comet_archive(directory):
    """``(messages, files)`` of the one offline archive in ``directory``: each line of its
    messages.json decoded by comet_ml's own message classes where it has one (metrics and
    parameters), as the JSON dict otherwise; and the archive's files by name."""
    from comet_ml.messages import MetricMessage, ParameterMessage
    decode = {MetricMessage.type: MetricMessage.from_message_dict,
              ParameterMessage.type: ParameterMessage.from_message_dict}
    (path,) = directory.glob("*.zip")
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    messages = [json.loads(line) for line in files["messages.json"].splitlines()]
    return [(m["type"], decode[m["type"]](m["payload"]) if m["type"] in decode else m["payload"])
            for m in messages], files


def neptune_operations(directory):
    """The operations of the one offline run under ``directory``, read by neptune's own disk
    queue into its ``Operation`` objects."""
    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.operation import Operation
    (run_dir,) = (directory / "offline").iterdir()
    queue = DiskQueue(data_path=run_dir, to_dict=lambda op: op.to_dict(),
                      from_dict=Operation.from_dict, lock=threading.RLock())
    try:
        return [element.obj for element in queue.get_batch(10_000)]
    finally:
        queue.close()


def no_secret_in(directory):
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data, path
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as archive:
                    for name in archive.namelist():
                        assert SECRET.encode() not in archive.read(name), (path, name)


def test_the_secret_check_finds_a_planted_key(tmp_path):
    with zipfile.ZipFile(tmp_path / "archive.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("messages.json", f'{{"api_key": "{SECRET}"}}'.encode())
    with pytest.raises(AssertionError, match="messages.json"):
        no_secret_in(tmp_path)


def write_every_kind(writer):
    writer.write_scalars(3, {"loss": torch.tensor(0.5), "train/accuracy": 0.75})
    writer.write_scalars(4, {"loss": np.float32(0.25)})
    writer.write_hparams({"lr": 0.1, "layers": [64, 64]})
    writer.write_texts(4, {"note": "hello"})
    writer.write_images(4, {"digit": fx.logging.Captioned(torch.rand(8, 8, 1), "a 3")})
    writer.write_videos(4, {"clip": np.zeros((1, 2, 4, 4, 3), np.uint8)})
    writer.write_audios(4, {"tone": np.zeros(80)}, sample_rate=8000)
    writer.write_histograms(4, {"w": torch.arange(10.0),
                                "binned": fx.logging.Histogram([0.0, 1.0, 2.0], [3, 1])})
    writer.flush()
    writer.close()


def test_comet_writer_offline_is_read_back_from_its_archive(comet, tmp_path, caplog, capfd):
    writer = fx.logging.CometWriter("fxtrain-test", **comet)
    assert isinstance(writer, fx.logging.Writer)
    write_every_kind(writer)
    messages, files = comet_archive(tmp_path / "comet")
    metrics = [(m.metric["metricName"], m.metric["step"], m.metric["metricValue"])
               for kind, m in messages if kind == "metric_msg"
               and m.metric["metricName"] in ("loss", "train/accuracy")]
    assert metrics == [("loss", 3, 0.5), ("train/accuracy", 3, 0.75), ("loss", 4, 0.25)]
    params = {p["paramName"]: p["paramValue"] for kind, m in messages
              if kind == "parameter_msg" and m.get_source() == "manual"
              for p in [m.param or m.params]}  # a list value is comet's "params"
    assert params == {"lr": 0.1, "layers": [64, 64]}
    uploads = {(p["upload_type"], p["additional_params"]["step"]): p
               for kind, p in messages if kind == "file_upload"}
    assert set(uploads) == {("text-sample", 4), ("visualization", 4), ("video", 4), ("audio", 4),
                            ("histogram3d", 4)}  # "visualization": Comet's images
    histograms = sorted(p["additional_params"]["fileName"] for kind, p in messages
                        if kind == "file_upload" and p["upload_type"] == "histogram3d")
    assert histograms == ["binned", "w"]  # one each (the uploads above are keyed by kind)
    assert uploads[("text-sample", 4)]["metadata"] == {"key": "note"}
    assert files[uploads[("text-sample", 4)]["file_path"]] == b"hello"
    assert uploads[("visualization", 4)]["metadata"] == {"caption": "a 3"}
    assert files[uploads[("audio", 4)]["file_path"]][:4] == b"RIFF"  # the WAV, copied in
    assert files[uploads[("video", 4)]["file_path"]][:3] == b"GIF"
    no_secret_in(tmp_path)
    assert SECRET not in caplog.text + "".join(capfd.readouterr())


def test_comet_writer_takes_binned_histograms(comet, tmp_path):
    writer = fx.logging.CometWriter(**comet)
    writer.write_histograms(2, {"binned": fx.logging.Histogram([0.0, 1.0, 2.0], [3, 1])})
    writer.close()
    messages, files = comet_archive(tmp_path / "comet")
    (upload,) = [p for kind, p in messages if kind == "file_upload"]
    histogram = json.loads(files[upload["file_path"]])
    assert upload["additional_params"]["fileName"] == "binned"
    assert upload["additional_params"]["step"] == 2
    assert sorted(count for _, count in histogram["index_values"]) == [1, 3]  # by bin


def test_neptune_writer_offline_is_read_back_from_its_operations(neptune, tmp_path, caplog,
                                                               capfd):
    writer = fx.logging.NeptuneWriter("workspace/fxtrain-test", **neptune)
    assert isinstance(writer, fx.logging.Writer)
    write_every_kind(writer)
    ops = neptune_operations(tmp_path / "neptune")
    series = [("/".join(op.path), v.step, v.value) for op in ops
              if type(op).__name__ in ("LogFloats", "LogStrings") for v in op.values]
    assert series == [("loss", 3, 0.5), ("train/accuracy", 3, 0.75), ("loss", 4, 0.25),
                      ("note", 4, "hello")]
    assigned = {"/".join(op.path): op.value for op in ops
                if op.path[0] == "parameters" and hasattr(op, "value")}
    assert assigned == {"parameters/lr": 0.1, "parameters/layers": "[64, 64]"}
    (images,) = [op for op in ops if type(op).__name__ == "LogImages"]
    assert images.path == ["digit"] and images.values[0].step == 4
    assert images.values[0].value.description == "a 3"
    uploads = sorted("/".join(op.path) for op in ops if type(op).__name__ == "UploadFile")
    assert uploads == ["clip/step_4_0", "tone/step_4_0"]
    assert not [op for op in ops if op.path[0] in ("w", "binned")]  # no histograms in Neptune
    no_secret_in(tmp_path)
    assert SECRET not in caplog.text + "".join(capfd.readouterr())


def test_neptune_writer_names_a_batch_of_images_by_index_at_any_size(neptune, tmp_path):
    """A batch ([N, H, W, C]) is a namespace of series in Neptune, which cannot hold a series
    at the same path: a batch of one is named as batches are, so a batch that grows keeps its
    names."""
    writer = fx.logging.NeptuneWriter("workspace/fxtrain-test", **neptune)
    writer.write_images(1, {"batch": torch.rand(1, 8, 8, 1)})
    writer.write_images(2, {"batch": torch.rand(2, 8, 8, 1)})
    writer.close()
    logged = sorted(("/".join(op.path), v.step) for op in neptune_operations(tmp_path / "neptune")
                    if type(op).__name__ == "LogImages" for v in op.values)
    assert logged == [("batch/0", 1), ("batch/0", 2), ("batch/1", 2)]


@pytest.mark.parametrize("tracker", ["comet", "neptune"])
def test_tracker_writers_inside_fit_through_multi_and_async_writers(tracker, request, tmp_path):
    kwargs = request.getfixturevalue(tracker)
    writer = (fx.logging.CometWriter(**kwargs) if tracker == "comet" else
              fx.logging.NeptuneWriter("workspace/fxtrain-test", **kwargs))
    jsonl = tmp_path / "metrics.jsonl"
    both = fx.logging.AsyncWriter(fx.logging.MultiWriter([writer,
                                                          fx.logging.JsonlWriter(jsonl)]))
    state = fx.TrainState.create(torch.nn.Linear(4, 2), fx.optim.sgd(0.1))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    step = fx.make_train_step(lambda s, p, b: ((s.apply(p, b[0]) - b[1]) ** 2).mean())
    fx.fit(state, step, fx.data.Batches((x, y), 8), max_steps=4, callbacks=[
        fx.callbacks.log_metrics(both, every=2),
        fx.callbacks.log_hparams(both, {"lr": 0.1, "model": {"width": 4}}, code_dir=None)])
    both.close()
    expected = [(e["step"], e["values"]["train/loss"]) for e in fx.logging.read_jsonl(jsonl)
                if e["kind"] == "scalars" and "train/loss" in e["values"]]
    if tracker == "comet":
        messages, _ = comet_archive(tmp_path / "comet")
        got = [(m.metric["step"], m.metric["metricValue"]) for kind, m in messages
               if kind == "metric_msg" and m.metric["metricName"] == "train/loss"]
    else:
        got = [(v.step, v.value) for op in neptune_operations(tmp_path / "neptune")
               if op.path == ["train", "loss"] for v in op.values]
    assert [s for s, _ in got] == [2, 4] and got == expected  # the same floats


@pytest.mark.parametrize("call,message", [
    (lambda: fx.logging.CometWriter(online=False, api_key=SECRET), "COMET_API_KEY"),
    (lambda: fx.logging.NeptuneWriter("w/p", mode="offline", api_token=SECRET),
     "NEPTUNE_API_TOKEN"),
    (lambda: fx.logging.CometWriter("p", experiment=object()), "either experiment= or"),
    (lambda: fx.logging.NeptuneWriter("w/p", run=object()), "either run= or"),
], ids=["comet-key", "neptune-token", "comet-both", "neptune-both"])
def test_tracker_writers_refuse_credentials_and_mixed_arguments(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert SECRET not in str(error.value)


def test_tracker_writers_leave_a_run_they_were_given_running(comet, neptune, tmp_path):
    import comet_ml
    import neptune as neptune_client
    del comet["online"]
    experiment = comet_ml.OfflineExperiment(**comet)
    writer = fx.logging.CometWriter(experiment=experiment)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert experiment.alive  # still the caller's to end
    experiment.end()
    run = neptune_client.init_run(project="workspace/fxtrain-test", **neptune)
    writer = fx.logging.NeptuneWriter(run=run)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert run.get_state() == "started"  # still the caller's to stop
    run.stop()
