"""``TensorBoardWriter``: clu's writer methods on tensorboardX, in one event file per logdir."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .media import caption_list, caption_markdown, gif_bytes, uncaptioned, wav_bytes
from .values import (Histogram, audio_batch, buckets, histogram_values, image_batch,
                     markdown_table, scalar_values, video_batch)


def _audio_summary(name: str, clip: np.ndarray, sample_rate: int):
    """A TensorBoard audio summary of a mono clip, as 16-bit PCM WAV (with the standard
    library: tensorboardX's own needs ``soundfile``)."""
    from tensorboardX.proto.summary_pb2 import Summary
    audio = Summary.Audio(sample_rate=sample_rate, num_channels=1, length_frames=len(clip),
                          encoded_audio_string=wav_bytes(clip, sample_rate),
                          content_type="audio/wav")
    return Summary(value=[Summary.Value(tag=name, audio=audio)])


def _gif_summary(name: str, frames: np.ndarray, fps: int):
    """A TensorBoard image summary holding an animated GIF of ``[T, H, W, C]`` uint8 frames
    (what tensorboardX writes through moviepy; here through Pillow)."""
    from tensorboardX.proto.summary_pb2 import Summary
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c,
                          encoded_image_string=gif_bytes(frames, fps))
    return Summary(value=[Summary.Value(tag=name, image=image)])


class TensorBoardWriter:
    """Writes to a TensorBoard event file in ``logdir`` (created if needed).

    Images are ``[N, H, W, C]`` or ``[H, W, C]`` (floats in [0, 1] or uint8) or matplotlib
    figures; videos ``[N, T, H, W, C]``; audio ``[N, T]`` or ``[T]`` in [-1, 1]; histograms
    raw values or ``fx.logging.Histogram`` (already binned).

    Images and videos may be ``fx.logging.Captioned``: the caption is written at the same step
    as a text ``<name>/caption`` (a list for a batch, in grid order), which TensorBoard's Text
    tab shows step by step. TensorBoard's image summaries have no caption field, and the
    description in a tag's summary metadata is read from the tag's first event only (one per
    tag, not per step), so a caption that changes with the step could not live there.

    Writes are synchronous (tensorboardX's summaries, written by this thread), so ``flush``
    means on disk; wrap it in ``fx.logging.AsyncWriter`` to write from a worker thread.

    Examples:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = fx.logging.TensorBoardWriter(tmp.name)
        >>> writer.write_scalars(100, {"train/loss": torch.tensor(0.25)})
        >>> writer.write_images(100, {"inputs": torch.rand(2, 8, 8, 3)})
        >>> writer.close()
        >>> len(list(writer.logdir.glob("events*")))
        1
        >>> tmp.cleanup()
    """

    binned_histograms = True  # write_histograms takes fx.logging.Histogram values
    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, logdir: str | os.PathLike, *, fps: int = 4):
        self._warned: set[str] = set()  # keys warned about as non-finite
        from tensorboardX.event_file_writer import EventsWriter
        self.logdir = Path(logdir)
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(str(self.logdir / "events"))
        except OSError as e:
            raise OSError(f"TensorBoardWriter: cannot create the log directory {self.logdir}: "
                          f"{e}") from e
        self.fps = fps
        self._closed = False

    def _add(self, summary, step: int | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event
        if self._closed:
            raise RuntimeError(f"TensorBoardWriter for {self.logdir} is closed")
        event = Event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = int(step)
        self._events.write_event(event)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """All of ``scalars`` in one event (TensorBoard's simple values)."""
        from tensorboardX.proto.summary_pb2 import Summary
        values = [Summary.Value(tag=k, simple_value=v)
                  for k, v in scalar_values(scalars, self._warned).items()]
        if values:
            self._add(Summary(value=values), step)

    def _caption(self, step: int, key: str, caption, n: int) -> None:
        from tensorboardX.summary import text
        if caption is not None:
            caption = caption if isinstance(caption, str) else caption_list(key, caption, n)
            self._add(text(f"{key}/caption", caption_markdown(caption)), step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        from tensorboardX.summary import image
        for k, v in images.items():
            v, caption = uncaptioned(v)
            batch = image_batch(k, v)
            self._add(image(k, batch, dataformats="NHWC"), step)
            self._caption(step, k, caption, len(batch))

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        for k, v in videos.items():
            v, caption = uncaptioned(v)
            clips = video_batch(k, v)
            for i, clip in enumerate(clips):
                self._add(_gif_summary(k if i == 0 else f"{k}/{i}", clip, self.fps), step)
            self._caption(step, k, caption, len(clips))

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        for k, v in audios.items():
            clips = audio_batch(k, v)
            for i, clip in enumerate(clips):
                name = k if len(clips) == 1 else f"{k}/{i}"
                self._add(_audio_summary(name, clip, sample_rate), step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboardX.summary import text
        for k, v in texts.items():
            self._add(text(k, str(v)), step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        from tensorboardX.summary import histogram, histogram_raw
        for k, v in arrays.items():
            if isinstance(v, Histogram):
                num, total, squares = v.sums()
                self._add(histogram_raw(
                    k, min=float(v.edges[0]), max=float(v.edges[-1]), num=num, sum=total,
                    sum_squares=squares, bucket_limits=v.edges[1:].tolist(),
                    bucket_counts=v.counts.tolist()), step)
                continue
            self._add(histogram(k, histogram_values(k, v), buckets(num_buckets, k) or
                                "tensorflow"), step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters, for TensorBoard's HPARAMS tab, in this run's event file."""
        from tensorboardX.summary import hparams as hparams_summary
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in hparams.items()}
        for summary in hparams_summary(flat, {}):
            self._add(summary)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Records the run's configuration: hyperparameters and a markdown table under
        ``config``."""
        self.write_hparams(config)
        self.write_texts(0, {"config": markdown_table(config)})

    def flush(self) -> None:
        """Everything written so far is in the event file when this returns."""
        if not self._closed:
            self._events.flush()

    def close(self) -> None:
        if not self._closed:
            self._events.flush()
            self._events.close()
            self._closed = True
