"""``JsonlWriter``: one JSON object per line, appended and flushed at every write.

Each line is ``{"step", "time", "kind", "values"}``. A process killed mid-write loses at most the
line being written; ``read_jsonl`` skips an incomplete last line. Arrays (images, videos, audio,
raw histograms) are summarised by shape and range, not stored: the TensorBoard writer keeps
them. A binned ``fx.logging.Histogram`` is small, so its edges and counts are stored. An
``fx.logging.Captioned`` image or video keeps its caption in its summary (``"caption"``: a str,
or a list of one per item).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .media import caption_list, uncaptioned
from .values import Histogram, as_array, image_batch, scalar_values, video_batch


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # "nan", "inf": strict JSON has no NaN


def _summary(arr) -> dict[str, Any]:
    arr = as_array(arr)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype),
            "min": _json_number(float(arr.min())) if arr.size else None,
            "max": _json_number(float(arr.max())) if arr.size else None}


def _media(key: str, value: Any, batch) -> dict[str, Any]:
    """The summary of an image or video batch, with its caption (a list: one per item)."""
    value, caption = uncaptioned(value)
    arr = batch(key, value)
    out = _summary(arr)
    if caption is not None:
        out["caption"] = caption if isinstance(caption, str) else \
            caption_list(key, caption, len(arr))
    return out


def _binned(h: Histogram) -> dict[str, Any]:
    return {"edges": [_json_number(x) for x in h.edges.tolist()], "counts": h.counts.tolist()}


def _drop_torn_line(path: Path, who: str = "JsonlWriter") -> None:
    """Cuts an incomplete last line (a process killed mid-write) off an existing log, so that
    appending starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
    warnings.warn(f"{who}: {path} ended in an incomplete line (a writer killed "
                  "mid-write); it was cut off before appending", stacklevel=3)


class JsonlWriter:
    """Appends events to ``path`` (parent directories are created).

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "metrics.jsonl"
        >>> writer = fx.logging.JsonlWriter(path)
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25)})
        >>> writer.close()
        >>> [(e["step"], e["kind"], e["values"]) for e in fx.logging.read_jsonl(path)]
        [(10, 'scalars', {'loss': 0.25})]
        >>> tmp.cleanup()
    """

    binned_histograms = True  # write_histograms takes fx.logging.Histogram values
    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, path: str | os.PathLike):
        self._warned: set[str] = set()  # keys warned about as non-finite
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise OSError(f"JsonlWriter: cannot open {self.path} for appending: {e}") from e

    def _write(self, step: int | None, kind: str, values: Any) -> None:
        line = json.dumps({"step": None if step is None else int(step), "time": time.time(),
                           "kind": kind, "values": values}, allow_nan=False)
        self._file.write(line + "\n")  # one write per event, then to the OS at once
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write(step, "scalars",
                    {k: _json_number(v) for k, v in scalar_values(scalars, self._warned).items()})

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._write(step, "images", {k: _media(k, v, image_batch) for k, v in images.items()})

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        self._write(step, "videos", {k: _media(k, v, video_batch) for k, v in videos.items()})

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        self._write(step, "audios", {k: {**_summary(v), "sample_rate": sample_rate}
                                     for k, v in audios.items()})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._write(step, "texts", {k: str(v) for k, v in texts.items()})

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        del num_buckets  # the summary has no buckets
        self._write(step, "histograms", {k: _binned(v) if isinstance(v, Histogram) else
                                         _summary(v) for k, v in arrays.items()})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write(None, "hparams", json.loads(json.dumps(dict(hparams), default=str)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The events in ``path``; an incomplete last line (a crash mid-write) is skipped.

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "metrics.jsonl"
        >>> _ = path.write_text('{"step": 1, "loss": 0.5}\\n{"step": 2, "lo')  # a crash mid-write
        >>> list(fx.logging.read_jsonl(path))
        [{'step': 1, 'loss': 0.5}]
        >>> tmp.cleanup()
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the torn last line of a killed process
                return
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
