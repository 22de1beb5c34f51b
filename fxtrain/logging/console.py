"""``ConsoleWriter``: readable lines through the ``fxtrain`` logger (or any logger)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .media import caption_list, uncaptioned
from .numbers import format_scalars
from .values import Histogram, as_array, image_batch, scalar_values, video_batch


def _format(x: float) -> str:
    return f"{x:.6g}"


def _quoted(caption: str | list[str]) -> str:
    return repr(caption)


class ConsoleWriter:
    """Writes each event as one line at ``level`` (INFO) to ``logger`` (``fxtrain``).

    Examples:
        >>> import logging, sys
        >>> logger = logging.getLogger("fxtrain.example")
        >>> logger.addHandler(logging.StreamHandler(sys.stdout))
        >>> logger.setLevel(logging.INFO)
        >>> logger.propagate = False
        >>> writer = fx.logging.ConsoleWriter(logger)
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25), "accuracy": 0.9})
        step 10 | loss=0.25 | accuracy=0.9
        >>> writer.write_texts(10, {"sample": "Return the"})
        step 10 | sample: Return the
        >>> writer.write_images(10, {"digit": fx.logging.Captioned(torch.rand(8, 8, 1), "a 3")})
        step 10 | images: digit [1, 8, 8, 1] 'a 3'
        >>> logger.handlers.clear()
    """

    binned_histograms = True  # write_histograms takes fx.logging.Histogram values
    captions = True  # write_images and write_videos take fx.logging.Captioned values

    def __init__(self, logger: logging.Logger | str = "fxtrain", level: int = logging.INFO):
        self._warned: set[str] = set()  # keys warned about as non-finite
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def _line(self, step, text: str) -> None:
        self.logger.log(self.level, "%s", text if step is None else f"step {step} | {text}")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._line(step, format_scalars(scalar_values(scalars, self._warned), sep=" | "))

    def _shapes(self, step, what: str, arrays: Mapping[str, Any], captions=None) -> None:
        captions = captions or {}
        self._line(step, f"{what}: " + ", ".join(
            f"{k} {list(v.shape)}" + (f" {_quoted(captions[k])}" if k in captions else "")
            for k, v in arrays.items()))

    def _media(self, step, what: str, values: Mapping[str, Any], batch) -> None:
        arrays, captions = {}, {}
        for k, v in values.items():
            v, caption = uncaptioned(v)
            arrays[k] = batch(k, v)
            if caption is not None:
                captions[k] = caption if isinstance(caption, str) else \
                    caption_list(k, caption, len(arrays[k]))
        self._shapes(step, what, arrays, captions)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._media(step, "images", images, image_batch)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        self._media(step, "videos", videos, video_batch)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        self._shapes(step, f"audio at {sample_rate} Hz",
                     {k: as_array(v) for k, v in audios.items()})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self._line(step, f"{k}: {v}")

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        del num_buckets
        parts = []
        for k, v in arrays.items():
            if isinstance(v, Histogram):
                n, mean, std = v.moments()
            else:
                arr = as_array(v).astype("float64")
                n = arr.size
                mean, std = (arr.mean(), arr.std()) if n else (0.0, 0.0)
            parts.append(f"{k} mean={_format(mean)} std={_format(std)}" if n else f"{k} (empty)")
        self._line(step, "histograms: " + ", ".join(parts))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._line(None, "hparams: " + ", ".join(f"{k}={v}" for k, v in hparams.items()))

    def flush(self) -> None:
        for handler in self.logger.handlers:
            handler.flush()

    def close(self) -> None:
        self.flush()
