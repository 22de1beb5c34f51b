"""Captions of logged images and videos, end to end: from ``log_media`` through each writer, read
back from the TensorBoard event file (tensorboard's own reader) and from the JSONL file."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import fxtrain as fx
from helpers import extra
from helpers_logging import read_tensorboard


def texts(acc):
    """{name: [(step, text)]} of the text summaries in a run read by tensorboard's reader
    (tensorboardX tags a text ``name`` as ``name/text_summary``)."""
    out = {}
    for tag in acc.Tags()["tensors"]:
        out[tag.removesuffix("/text_summary")] = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
    return out


def test_tensorboard_writes_a_caption_beside_its_image_at_the_same_step(tmp_path):
    extra("tensorboard")
    w = fx.logging.TensorBoardWriter(tmp_path)
    w.write_images(3, {"digit": fx.logging.Captioned(torch.rand(8, 8, 1), "a three"),
                       "plain": torch.rand(8, 8, 3)})
    w.write_images(5, {"digit": fx.logging.Captioned(torch.rand(2, 8, 8, 1), ["3", "7"])})
    w.write_videos(5, {"clip": fx.logging.Captioned(np.zeros((1, 2, 4, 4, 3)), "still")})
    w.close()
    acc = read_tensorboard(tmp_path)
    assert [e.step for e in acc.Images("digit")] == [3, 5]
    assert acc.Images("digit")[1].width == 16  # the batch of two, tiled
    assert [e.step for e in acc.Images("clip")] == [5]
    got = texts(acc)
    assert got["digit/caption"] == [(3, "a three"), (5, "- 0: 3\n- 1: 7")]
    assert got["clip/caption"] == [(5, "still")]
    assert "plain/caption" not in got


def test_jsonl_keeps_the_caption_in_the_image_summary(tmp_path):
    w = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    w.write_images(2, {"digit": fx.logging.Captioned(torch.rand(2, 8, 8, 1), ("3", "7")),
                       "plain": torch.rand(8, 8, 3)})
    w.write_videos(2, {"clip": fx.logging.Captioned(np.zeros((1, 2, 4, 4, 3)), "still")})
    w.close()
    images, videos = fx.logging.read_jsonl(tmp_path / "m.jsonl")
    assert images["values"]["digit"]["caption"] == ["3", "7"]
    assert images["values"]["digit"]["shape"] == [2, 8, 8, 1]
    assert "caption" not in images["values"]["plain"]
    assert videos["values"]["clip"]["caption"] == "still"


def test_console_multi_and_async_writers_pass_captions_on(tmp_path, caplog):
    jsonl = fx.logging.JsonlWriter(tmp_path / "m.jsonl")
    w = fx.logging.AsyncWriter(fx.logging.MultiWriter([fx.logging.ConsoleWriter(), jsonl]))
    assert w.captions and fx.logging.MultiWriter([jsonl, object()]).captions is False
    with caplog.at_level(logging.INFO, logger="fxtrain"):
        w.write_images(1, {"x": fx.logging.Captioned(torch.rand(4, 4, 3), "noise")})
        w.close()
    assert "images: x [1, 4, 4, 3] 'noise'" in caplog.text
    (event,) = fx.logging.read_jsonl(tmp_path / "m.jsonl")
    assert event["values"]["x"]["caption"] == "noise"


def test_a_caption_per_image_must_match_the_batch():
    with pytest.raises(ValueError, match="'digit' has 2 images or videos but 3 captions"):
        fx.logging.ConsoleWriter().write_images(
            1, {"digit": fx.logging.Captioned(torch.rand(2, 8, 8, 1), ["a", "b", "c"])})
    with pytest.raises(TypeError, match="caption must be a str or a list of str"):
        fx.logging.Captioned(torch.rand(8, 8, 1), [1, 2])


class CluLike:
    """A writer without the captions capability (as clu's are), keeping what it is given."""

    def __init__(self):
        self.images, self.texts = [], []

    def write_scalars(self, step, scalars):
        pass

    def write_images(self, step, images):
        self.images.append((step, dict(images)))

    def write_videos(self, step, videos):
        self.images.append((step, dict(videos)))

    def write_texts(self, step, texts):
        self.texts.append((step, dict(texts)))


def media_run(writer, media, steps=2):
    def loss_fn(state, params, batch):
        x, y = batch
        return ((state.apply(params, x) - y) ** 2).mean()

    x = torch.randn(16, 2)
    state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
    fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches((x, x.sum(1, keepdim=True)), 4),
           max_steps=steps, callbacks=[fx.callbacks.log_media(writer, media, every=2)])


def test_log_media_captions_reach_tensorboard_and_jsonl(tmp_path):
    extra("tensorboard")
    tb = fx.logging.TensorBoardWriter(tmp_path / "tb")
    jsonl = fx.logging.JsonlWriter(tmp_path / "m.jsonl")

    def media(state):
        step = int(state.step)
        return {"pair": (torch.rand(2, 8, 8, 1), [f"left {step}", f"right {step}"]),
                "one": fx.logging.Captioned(torch.rand(8, 8), f"step {step}"),
                "clip": (torch.rand(1, 2, 4, 4, 3), "moving")}

    media_run(fx.logging.MultiWriter([tb, jsonl]), media, steps=4)
    tb.close()
    jsonl.close()
    got = texts(read_tensorboard(tmp_path / "tb"))
    assert got["pair/caption"] == [(2, "- 0: left 2\n- 1: right 2"),
                                   (4, "- 0: left 4\n- 1: right 4")]
    assert got["one/caption"] == [(2, "step 2"), (4, "step 4")]
    assert got["clip/caption"] == [(2, "moving"), (4, "moving")]
    events = [e for e in fx.logging.read_jsonl(tmp_path / "m.jsonl") if e["step"] == 4]
    images = next(e["values"] for e in events if e["kind"] == "images")
    videos = next(e["values"] for e in events if e["kind"] == "videos")
    assert images["pair"]["caption"] == ["left 4", "right 4"]
    assert images["one"] == {**images["one"], "caption": "step 4", "shape": [1, 8, 8, 1]}
    assert videos["clip"]["caption"] == "moving"


def test_log_media_writes_captions_as_texts_for_writers_without_captions():
    writer = CluLike()
    media_run(writer, lambda s: {"pair": (torch.rand(2, 8, 8, 1), ["a", "b"]),
                                 "fig": fx.logging.Captioned(torch.rand(4, 4, 3), "c")})
    ((step, images),) = writer.images
    assert step == 2 and sorted(images) == ["fig", "pair"]
    assert not any(isinstance(v, fx.logging.Captioned) for v in images.values())
    assert writer.texts == [(2, {"pair/caption": "- 0: a\n- 1: b", "fig/caption": "c"})]


def test_log_media_refuses_a_caption_on_what_is_not_an_image_or_video():
    with pytest.raises(TypeError, match="'loss' has a caption, but only images and videos"):
        media_run(CluLike(), lambda s: {"loss": (torch.tensor(0.5), "the loss")})
    with pytest.raises(ValueError, match="'pair' has 2 images or videos but 1 captions"):
        media_run(CluLike(), lambda s: {"pair": (torch.rand(2, 8, 8, 1), ["a"])})
