"""Writers from the optional extras: WandbWriter in wandb's offline mode (read back from the
run's .wandb file), and clu's writers wrapping fxtrain's inside fit (clu needs TensorFlow, so
that test runs in its own process)."""

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import extra

import fxtrain as fx


def wandb_records(run_dir):
    """The protobuf records of an offline run: a 7-byte header (":W&B", magic, version), then
    LevelDB-log records in 32 KiB blocks (crc32c, length, type; FULL=1, FIRST=2, MIDDLE=3,
    LAST=4)."""
    from wandb.proto import wandb_internal_pb2
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def finished_wandb_records(run_dir):
    """The run's records once wandb's service has written its exit record: the service may
    still be writing the file when finish returns: not there yet (ValueError from the glob), its
    last record half written (a protobuf DecodeError), or the exit record still to come."""
    from google.protobuf.message import DecodeError
    for _ in range(100):
        try:
            records = wandb_records(run_dir)
        except (DecodeError, ValueError):
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.1)
    raise AssertionError(f"wandb wrote no complete run under {run_dir} in 10 s")


def test_wandb_writer_offline_writes_every_kind(tmp_path, monkeypatch):
    extra("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = fx.logging.WandbWriter("fxtrain-test", mode="offline", dir=str(tmp_path), name="t")
    state = fx.TrainState.create(torch.nn.Linear(4, 2), fx.optim.sgd(0.1))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    step = fx.make_train_step(lambda s, p, b: ((s.apply(p, b[0]) - b[1]) ** 2).mean())
    fx.fit(state, step, fx.data.Batches((x, y), 8), max_steps=4, callbacks=[
        fx.callbacks.log_metrics(writer, every=2),
        fx.callbacks.log_hparams(writer, {"lr": 0.1, "model": {"width": 4}}),
        fx.callbacks.model_watch(writer, log="parameters", every=4)])
    writer.write_images(5, {"img": fx.logging.Captioned(np.zeros((2, 4, 4, 3)), ["a", "b"])})
    writer.write_videos(5, {"video": fx.logging.Captioned(np.zeros((1, 3, 4, 4, 3)), "still")})
    writer.write_audios(5, {"tone": np.zeros(100)}, sample_rate=8000)
    writer.write_texts(5, {"note": "hello"})
    writer.close()
    records = finished_wandb_records(tmp_path)
    history, config = {}, {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            history[items["_step"]] = items
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert config["lr"] == 0.1 and config["model.width"] == 4
    assert sorted(history) == [0, 2, 4, 5]  # 0: log_hparams' config table
    assert isinstance(history[2]["train/loss"], float) and "train/grad_norm" in history[4]
    assert history[4]["parameters/weight/_type"] == "histogram"
    assert sum(history[4]["parameters/weight/values"]) == 8  # the 2x4 weight, binned
    assert history[5]["img/_type"] == "images/separated" and history[5]["img/count"] == 2
    assert history[5]["img/captions"] == ["a", "b"]  # wandb.Image's own caption field
    assert history[5]["video/_type"] == "videos"
    assert [v["caption"] for v in history[5]["video/videos"]] == ["still"]
    assert history[5]["tone/_type"] == "audio-file"
    assert history[5]["note/_type"] == "table-file"


def test_wandb_writer_bad_input():
    extra("wandb")
    with pytest.raises(ValueError, match="either run= or wandb.init's arguments"):
        fx.logging.WandbWriter("p", run=object())
