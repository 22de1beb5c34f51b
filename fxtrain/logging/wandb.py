"""``WandbWriter``: clu's writer methods on Weights & Biases (the optional ``wandb`` extra)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from .media import caption_list, gif_bytes, uncaptioned, wav_bytes
from .values import (Histogram, audio_batch, buckets, histogram_values, image_batch,
                     scalar_values, video_batch)
from .writer import client



def _captioned(key: str, value: Any, batch) -> list[tuple[Any, str | None]]:
    """The items of an image or video batch, each with its caption (wandb's own field)."""
    value, caption = uncaptioned(value)
    items = batch(key, value)
    captions = [None] * len(items) if caption is None else caption_list(key, caption, len(items))
    return list(zip(items, captions))


class WandbWriter:
    """Writes to a wandb run: one it starts (``wandb.init(project=..., **init_kwargs)``) and
    finishes on ``close``, or ``run=`` one you started (left running on ``close``).

    Steps are wandb's ``step``: wandb drops (with a warning) anything logged at a step below
    one already logged. ``mode="offline"`` writes under ``dir`` without a network.

    Examples:
        >>> writer = fx.logging.WandbWriter("my-project", name="exp1", mode="disabled")
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25)})
        >>> writer.close()
    """

    binned_histograms = True  # write_histograms takes fx.logging.Histogram values
    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, project: str | None = None, *, run: Any = None, fps: int = 4,
                 **init_kwargs: Any):
        self._warned: set[str] = set()  # keys warned about as non-finite
        self._wandb = client("wandb", "WandbWriter", "wandb")
        if run is not None and (project is not None or init_kwargs):
            raise ValueError("WandbWriter: pass either run= or wandb.init's arguments, not both")
        self._owned = run is None
        self.run = run if run is not None else self._wandb.init(project=project, **init_kwargs)
        self.fps = fps

    def _log(self, step: int, values: dict[str, Any]) -> None:
        if values:
            self.run.log(values, step=int(step))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._log(step, scalar_values(scalars, self._warned))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        wb = self._wandb
        self._log(step, {k: [wb.Image(img, caption=c) for img, c in _captioned(k, v, image_batch)]
                         for k, v in images.items()})

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        wb = self._wandb
        self._log(step, {k: [wb.Video(io.BytesIO(gif_bytes(clip, self.fps)), format="gif",
                                      caption=c) for clip, c in _captioned(k, v, video_batch)]
                         for k, v in videos.items()})

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        # wandb encodes numpy audio with soundfile; WAV files of our own need nothing more
        wb = self._wandb
        out = {}
        for k, v in audios.items():
            clips = audio_batch(k, v)
            for i, clip in enumerate(clips):  # one key per clip: lists of clips need soundfile
                path = f"{self.run.dir}/audio-{int(step)}-{k.replace('/', '_')}-{i}.wav"
                with open(path, "wb") as f:
                    f.write(wav_bytes(clip, sample_rate))
                out[k if len(clips) == 1 else f"{k}/{i}"] = wb.Audio(path, sample_rate=sample_rate)
        self._log(step, out)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        wb = self._wandb
        self._log(step, {k: wb.Table(columns=["text"], data=[[str(v)]])
                         for k, v in texts.items()})

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        wb = self._wandb
        out = {}
        for k, v in arrays.items():
            if isinstance(v, Histogram):
                out[k] = wb.Histogram(np_histogram=(v.counts.tolist(), v.edges.tolist()))
            else:
                out[k] = wb.Histogram(histogram_values(k, v),
                                      num_bins=min(buckets(num_buckets, k) or 64, 512))
        self._log(step, out)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)

    def flush(self) -> None:
        pass  # wandb streams every log call to its own writer process

    def close(self) -> None:
        if self._owned and self.run is not None:
            self.run.finish()
            self.run = None
