"""``CometWriter``: clu's writer methods on a Comet experiment (the optional ``comet`` extra).

Scalars are metrics at their step; hyperparameters are parameters; texts are text samples (the
key in their metadata, as ``{"key": name}``); images, videos (GIFs) and audio (WAVs) are Comet's
own assets of those kinds, at their step, a caption in the asset's metadata; histograms are
Comet's 3D histograms (Comet bins the values into its own fixed buckets, so ``num_buckets`` is
not used; an ``fx.logging.Histogram`` binned on the device goes in as its bin centres with
their counts).

Credentials stay with comet_ml: the API key comes from ``COMET_API_KEY`` or Comet's config file
(``~/.comet.config``); an offline experiment needs none. The writer takes no key.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .media import caption_list, gif_bytes, uncaptioned, wav_bytes
from .values import (Histogram, audio_batch, histogram_values, image_batch, scalar_values,
                     video_batch)
from .writer import client, refuse_credentials

_CREDENTIALS = ("api_key",)



def _items(key: str, value: Any, batch) -> list[tuple[str, Any, str | None]]:
    """``(name, item, caption)`` for each item of an image or video batch: the key alone for
    one item, ``key/i`` for each of several."""
    value, caption = uncaptioned(value)
    items = batch(key, value)
    captions = [None] * len(items) if caption is None else caption_list(key, caption, len(items))
    return [(key if len(items) == 1 else f"{key}/{i}", item, c)
            for i, (item, c) in enumerate(zip(items, captions))]


def _pil(image):
    """A PIL image of ``[H, W, C]`` uint8: comet_ml rescales numpy images itself (and fails on
    a constant one)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("writing images to Comet needs Pillow (pip install pillow)") from e

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


class CometWriter:
    """Writes to a Comet experiment: one it starts (``comet_ml.Experiment``, or
    ``comet_ml.OfflineExperiment`` with ``online=False``, given ``project_name`` and the
    experiment's own keyword arguments) and ends on ``close``, or ``experiment=`` one you
    started (left running on ``close``).

    An offline experiment is written as a zip archive under ``offline_directory`` (Comet's
    default: ``COMET_OFFLINE_DIRECTORY``, else ``.cometml-runs``), uploaded later with ``comet
    upload``. Comet's own automatic logging (stdout, the environment, git, the command line)
    follows comet_ml's defaults and settings (``COMET_DISABLE_AUTO_LOGGING=1``, or the
    experiment's arguments such as ``auto_output_logging=False``, ``log_env_details=False``).

    Examples:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = fx.logging.CometWriter("demo", online=False, offline_directory=tmp.name,
        ...                                 auto_output_logging=False, log_env_details=False,
        ...                                 log_code=False, log_git_metadata=False,
        ...                                 log_git_patch=False, display_summary_level=0)
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25)})
        >>> writer.close()
        >>> len(list(Path(tmp.name).glob("*.zip")))  # the offline experiment's archive
        1
        >>> tmp.cleanup()
    """

    binned_histograms = True  # write_histograms takes fx.logging.Histogram values
    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, project_name: str | None = None, *, online: bool = True,
                 experiment: Any = None, fps: int = 4, **experiment_kwargs: Any):
        self._warned: set[str] = set()  # keys warned about as non-finite
        refuse_credentials("CometWriter", experiment_kwargs, _CREDENTIALS,
                           "COMET_API_KEY or Comet's config file (~/.comet.config)")
        self._comet = client("comet_ml", "CometWriter", "comet")
        if experiment is not None and (project_name is not None or experiment_kwargs):
            raise ValueError("CometWriter: pass either experiment= or the experiment's "
                             "arguments, not both")
        self._owned = experiment is None
        if experiment is None:
            start = self._comet.Experiment if online else self._comet.OfflineExperiment
            experiment = start(project_name=project_name, **experiment_kwargs)
        self.experiment, self.fps = experiment, fps
        self._files = tempfile.TemporaryDirectory(prefix="fxtrain-comet-")  # WAVs to upload

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = scalar_values(scalars, self._warned)
        if values:
            self.experiment.log_metrics(values, step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for k, v in images.items():
            for name, image, caption in _items(k, v, image_batch):
                self.experiment.log_image(_pil(image), name=name, step=int(step),
                                          metadata=None if caption is None else
                                          {"caption": caption})

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        for k, v in videos.items():
            for name, clip, caption in _items(k, v, video_batch):
                self.experiment.log_video(io.BytesIO(gif_bytes(clip, self.fps)),
                                          name=f"{name}.gif", format="gif", step=int(step),
                                          metadata=None if caption is None else
                                          {"caption": caption})

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        # comet_ml encodes numpy audio with scipy; WAV files of our own need nothing more
        for k, v in audios.items():
            for i, clip in enumerate(audio_batch(k, v)):
                path = Path(self._files.name) / f"{int(step)}-{k.replace('/', '_')}-{i}.wav"
                path.write_bytes(wav_bytes(clip, sample_rate))
                self.experiment.log_audio(str(path), sample_rate=sample_rate,
                                          file_name=f"{k}-{i}.wav", step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self.experiment.log_text(str(v), step=int(step), metadata={"key": k})

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        del num_buckets  # Comet bins into its own buckets (see the module)
        for k, v in arrays.items():
            if isinstance(v, Histogram):
                histogram = self._comet.Histogram()
                histogram.add(v.centres, counts=v.counts)
                self.experiment.log_histogram_3d(histogram, name=k, step=int(step))
            else:
                self.experiment.log_histogram_3d(histogram_values(k, v), name=k,
                                                 step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.experiment.log_parameters(dict(hparams))

    def flush(self) -> None:
        self.experiment.flush()

    def close(self) -> None:
        if self._owned and self.experiment is not None:
            self.experiment.end()
            self.experiment = None
        elif self.experiment is not None:
            self.experiment.flush()  # the audio files are uploaded before they go
        self._files.cleanup()
