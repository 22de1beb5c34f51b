"""``NeptuneWriter``: clu's writer methods on a Neptune run (the optional ``neptune`` extra).

Each key is a field of the run at its own path (``train/loss`` is the field ``loss`` in the
namespace ``train``): scalars are float series and texts string series, appended at their step;
images are image series (a batch's items at ``key/0``, ``key/1``, ...), a caption as the image's
description; videos (GIFs) and audio (WAVs) are files at ``key/step_<n>_<i>`` (a file field has
no caption: a video's is dropped); hyperparameters are the fields under ``parameters`` (values
Neptune cannot hold, such as lists, as their strings). Neptune has no histogram type:
histograms are skipped (TensorBoard keeps them). Neptune cuts each entry of a string series at
1000 characters (and warns), so a longer text is cut.

Credentials stay with neptune: the API token comes from ``NEPTUNE_API_TOKEN`` (and the project
from ``NEPTUNE_PROJECT`` where not given); an offline run needs none. The writer takes no token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .media import caption_list, gif_bytes, uncaptioned, wav_bytes
from .values import audio_batch, image_batch, scalar_values, video_batch
from .writer import client, refuse_credentials

_CREDENTIALS = ("api_token",)



class NeptuneWriter:
    """Writes to a Neptune run: one it starts (``neptune.init_run(project=...,
    **init_kwargs)``) and stops on ``close``, or ``run=`` one you started (left running on
    ``close``).

    Steps are Neptune's ``step``: a series takes only steps above its last (Neptune drops the
    others). ``mode="offline"`` writes under ``NEPTUNE_DATA_DIRECTORY`` (default ``.neptune``)
    without a network, uploaded later with ``neptune sync``.

    Examples:
        >>> import os, pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> os.environ["NEPTUNE_DATA_DIRECTORY"] = tmp.name
        >>> writer = fx.logging.NeptuneWriter("workspace/demo", mode="offline",
        ...                                   capture_hardware_metrics=False, git_ref=False)
        [neptune] [info   ] Neptune initialized. Open in the app: offline/...
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25)})
        >>> writer.write_hparams({"lr": 0.1, "layers": [64, 64]})  # the list as '[64, 64]'
        >>> writer.close()
        [neptune] [info   ] Shutting down background jobs, please wait a moment...
        [neptune] [info   ] Done!
        >>> [p.name.split("__")[0] for p in pathlib.Path(tmp.name, "offline").iterdir()]
        ['run']
        >>> del os.environ["NEPTUNE_DATA_DIRECTORY"]
        >>> tmp.cleanup()
    """

    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, project: str | None = None, *, run: Any = None, fps: int = 4,
                 **init_kwargs: Any):
        self._warned: set[str] = set()  # keys warned about as non-finite
        refuse_credentials("NeptuneWriter", init_kwargs, _CREDENTIALS, "NEPTUNE_API_TOKEN")
        self._neptune = client("neptune", "NeptuneWriter", "neptune")
        if run is not None and (project is not None or init_kwargs):
            raise ValueError("NeptuneWriter: pass either run= or neptune.init_run's arguments, "
                             "not both")
        self._owned = run is None
        self.run = run if run is not None else self._neptune.init_run(project=project,
                                                                     **init_kwargs)
        self.fps = fps

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for k, v in scalar_values(scalars, self._warned).items():
            self.run[k].append(v, step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        from neptune.types import File

        for k, v in images.items():
            value, caption = uncaptioned(v)
            batch = image_batch(k, value)
            captions = [None] * len(batch) if caption is None else \
                caption_list(k, caption, len(batch))
            # a batch ([N, H, W, C], even of one) is a namespace of series, one image a series:
            # a path cannot be both, so a batch of one keeps the batch's names
            several = len(batch) > 1 or getattr(value, "ndim", 0) == 4
            for i, (image, c) in enumerate(zip(batch, captions)):
                self.run[f"{k}/{i}" if several else k].append(
                    File.as_image(image[..., 0] if image.shape[-1] == 1 else image,
                                  autoscale=False),  # already uint8 in [0, 255]
                    step=int(step), description=c)

    def _file(self, key: str, step: int, i: int, data: bytes, extension: str) -> None:
        from neptune.types import File

        self.run[f"{key}/step_{int(step)}_{i}"].upload(File.from_content(data,
                                                                        extension=extension))

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        for k, v in videos.items():
            value, _ = uncaptioned(v)  # a file field has no caption
            for i, clip in enumerate(video_batch(k, value)):
                self._file(k, step, i, gif_bytes(clip, self.fps), "gif")

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        for k, v in audios.items():
            for i, clip in enumerate(audio_batch(k, v)):
                self._file(k, step, i, wav_bytes(clip, sample_rate), "wav")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self.run[k].append(str(v), step=int(step))

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        pass  # Neptune has no histograms (see the module)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from neptune.utils import stringify_unsupported

        self.run["parameters"] = stringify_unsupported(dict(hparams))

    def flush(self) -> None:
        self.run.wait()  # offline: on disk; online: sent

    def close(self) -> None:
        if self._owned and self.run is not None:
            self.run.stop()
            self.run = None
