"""``TensorBoardWriter``: clu's writer methods on tensorboardX, in one event file per logdir."""

from __future__ import annotations

import io
import json
import os
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .values import as_array, image_batch, scalars, video_batch

__all__ = ["TensorBoardWriter"]


def _is_figure(value: Any) -> bool:
    return type(value).__module__.startswith("matplotlib") and type(value).__name__ == "Figure"


def _audio_summary(name: str, clip: np.ndarray, sample_rate: int):
    """A TensorBoard audio summary of a mono clip in [-1, 1], as 16-bit PCM WAV (with the
    standard library's ``wave``: tensorboardX's own needs ``soundfile``)."""
    from tensorboardX.proto.summary_pb2 import Summary
    pcm = (np.clip(np.nan_to_num(clip), -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    audio = Summary.Audio(sample_rate=sample_rate, num_channels=1, length_frames=len(pcm),
                          encoded_audio_string=buffer.getvalue(), content_type="audio/wav")
    return Summary(value=[Summary.Value(tag=name, audio=audio)])


def _gif_summary(name: str, frames: np.ndarray, fps: int):
    """A TensorBoard image summary holding an animated GIF of ``[T, H, W, C]`` uint8 frames
    (what tensorboardX writes through moviepy; here through Pillow)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("write_videos needs Pillow (pip install pillow)") from e
    from tensorboardX.proto.summary_pb2 import Summary
    t, h, w, c = frames.shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    images = [Image.fromarray(f[..., 0] if c == 1 else f, mode) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=name, image=image)])


def _markdown_table(mapping: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {json.dumps(v, default=str)} |" for k, v in mapping.items())
    return "| key | value |\n|---|---|\n" + rows


class TensorBoardWriter:
    """Writes to a TensorBoard event file in ``logdir`` (created if needed).

    Images are ``[N, H, W, C]`` or ``[H, W, C]`` (floats in [0, 1] or uint8) or matplotlib
    figures; videos ``[N, T, H, W, C]``; audio ``[N, T]`` or ``[T]`` in [-1, 1].

    Example::

        writer = fx.logging.TensorBoardWriter("runs/exp1")
        writer.write_scalars(100, {"train/loss": loss})
    """

    def __init__(self, logdir: str | os.PathLike, *, fps: int = 4):
        from tensorboardX import SummaryWriter
        self.logdir = Path(logdir)
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"TensorBoardWriter: cannot create the log directory {self.logdir}: "
                          f"{e}") from e
        self.fps = fps
        self._writer = SummaryWriter(str(self.logdir), flush_secs=10)

    def write_scalars(self, step: int, mapping: Mapping[str, Any]) -> None:
        for k, v in scalars(mapping).items():
            self._writer.add_scalar(k, v, int(step))

    def write_images(self, step: int, mapping: Mapping[str, Any]) -> None:
        for k, v in mapping.items():
            if _is_figure(v):
                self._writer.add_figure(k, v, int(step), close=False)
            else:
                self._writer.add_images(k, image_batch(k, v), int(step), dataformats="NHWC")

    def write_videos(self, step: int, mapping: Mapping[str, Any]) -> None:
        for k, v in mapping.items():
            for i, clip in enumerate(video_batch(k, v)):
                name = k if i == 0 else f"{k}/{i}"
                self._writer._get_file_writer().add_summary(
                    _gif_summary(name, clip, self.fps), int(step))

    def write_audios(self, step: int, mapping: Mapping[str, Any], *, sample_rate: int) -> None:
        for k, v in mapping.items():
            clips = as_array(v).astype(np.float32)
            clips = clips[None] if clips.ndim == 1 else clips
            if clips.ndim != 2:
                raise ValueError(f"audio {k!r} has shape {clips.shape}; expected [N, T] or [T]")
            for i, clip in enumerate(clips):
                name = k if len(clips) == 1 else f"{k}/{i}"
                self._writer._get_file_writer().add_summary(
                    _audio_summary(name, clip, sample_rate), int(step))

    def write_texts(self, step: int, mapping: Mapping[str, str]) -> None:
        for k, v in mapping.items():
            self._writer.add_text(k, str(v), int(step))

    def write_histograms(self, step: int, mapping: Mapping[str, Any],
                         num_buckets: int | None = None) -> None:
        for k, v in mapping.items():
            arr = as_array(v).astype(np.float64).reshape(-1)
            if arr.size == 0:
                raise ValueError(f"histogram {k!r} is empty")
            self._writer.add_histogram(k, arr, int(step), bins=num_buckets or "tensorflow")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters, for TensorBoard's HPARAMS tab, in this run's event file."""
        from tensorboardX.summary import hparams as hparams_summary
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in hparams.items()}
        for summary in hparams_summary(flat, {}):
            self._writer._get_file_writer().add_summary(summary)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Records the run's configuration: hyperparameters and a markdown table under
        ``config``."""
        self.write_hparams(config)
        self._writer.add_text("config", _markdown_table(config), 0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
