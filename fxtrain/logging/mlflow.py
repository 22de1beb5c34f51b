"""``MlflowWriter``: clu's writer methods on an MLflow run (the optional ``mlflow`` extra).

It talks to the tracking store through ``MlflowClient`` with an explicit run id, never through
mlflow's process-wide active run, so several writers (or your own ``mlflow.start_run``) do not
mix. Scalars are metrics at their step; hyperparameters are params; texts, images, videos and
audio are artifacts under ``texts/``, ``images/``, ``videos/`` and ``audio/`` (images through
``log_image``, which MLflow's UI shows per step). MLflow has no histogram type: histograms are
skipped (TensorBoard keeps them).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .media import gif_bytes, uncaptioned, wav_bytes
from .values import audio_batch, image_batch, scalar_values, video_batch

_PARAM_LIMIT = 6000  # MLflow's longest param value


def _client(tracking_uri: str | None):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError("MlflowWriter needs mlflow: pip install 'fxtrain[mlflow]'") from e
    return MlflowClient(tracking_uri=tracking_uri)


def _local_store(tracking_uri: str | None) -> str | None:
    """A folder given as the tracking URI becomes a ``file:`` URI; MLflow 3 refuses its file
    store unless ``MLFLOW_ALLOW_FILE_STORE`` is set, which a local folder asks for (it is the
    store the writer was given, so it is set for this process, where not set already)."""
    if tracking_uri is None or "://" in tracking_uri or tracking_uri.startswith("file:"):
        local = tracking_uri is not None and tracking_uri.startswith("file:")
    else:
        tracking_uri, local = Path(tracking_uri).absolute().as_uri(), True
    if local:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return tracking_uri


class MlflowWriter:
    """Writes to an MLflow run: one it creates in ``experiment`` (made if missing) and ends on
    ``close``, or ``run_id=`` one that exists (left running on ``close``).

    ``tracking_uri``: a folder (a local file store, ``mlruns``), a ``file:`` or server URI, or
    None for mlflow's own default (``MLFLOW_TRACKING_URI``).

    Examples:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = fx.logging.MlflowWriter(tmp.name + "/mlruns", experiment="demo")
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25)})
        >>> writer.close()
        >>> [(m.step, m.value) for m in writer.client.get_metric_history(writer.run_id, "loss")]
        [(10, 0.25)]
        >>> tmp.cleanup()
    """

    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, tracking_uri: str | None = None, *, experiment: str = "fxtrain",
                 run_name: str | None = None, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, fps: int = 4):
        self._warned: set[str] = set()  # keys warned about as non-finite
        self.client = _client(_local_store(tracking_uri))
        self._owned = run_id is None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else \
                self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name,
                                            tags=dict(tags or {})).info.run_id
        self.run_id, self.fps, self._closed = run_id, fps, False

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step))
                   for k, v in scalar_values(scalars, self._warned).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self.client.log_text(self.run_id, str(v), f"texts/{k}/step_{int(step)}.txt")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for k, v in images.items():
            value, caption = uncaptioned(v)
            for i, image in enumerate(image_batch(k, value)):
                self.client.log_image(self.run_id, image, key=k if i == 0 else f"{k}/{i}",
                                      step=int(step))
            if caption is not None:
                self.client.log_text(self.run_id, json.dumps(caption),
                                     f"images/{k}/step_{int(step)}_caption.json")

    def _artifact(self, folder: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), folder)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        for k, v in videos.items():
            value, _ = uncaptioned(v)
            for i, clip in enumerate(video_batch(k, value)):
                self._artifact(f"videos/{k}", f"step_{int(step)}_{i}.gif",
                               gif_bytes(clip, self.fps))

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        for k, v in audios.items():
            for i, clip in enumerate(audio_batch(k, v)):
                self._artifact(f"audio/{k}", f"step_{int(step)}_{i}.wav",
                               wav_bytes(clip, sample_rate))

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        pass  # MLflow has no histograms (see the module)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in hparams.items()]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def flush(self) -> None:
        pass  # each call reaches the store before it returns

    def close(self) -> None:
        if self._owned and not self._closed:
            self.client.set_terminated(self.run_id)
            self._closed = True
