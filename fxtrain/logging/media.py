"""Media values for writers: audio clips with their sample rate, captioned images and videos,
matplotlib figures as pixels."""

from __future__ import annotations

import dataclasses
import io
import wave
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Audio:
    """A clip ``[T]`` or clips ``[N, T]`` in [-1, 1], sampled at ``sample_rate`` Hz (for
    ``fx.callbacks.log_media``, where a bare 1-D array would be ambiguous).

    Examples:
        >>> import math
        >>> clip = torch.sin(torch.arange(8000) * 2 * math.pi * 440 / 8000)
        >>> fx.logging.Audio(clip, sample_rate=8000).sample_rate
        8000
        >>> fx.logging.Audio(clip, sample_rate=0)
        Traceback (most recent call last):
            ...
        ValueError: Audio: sample_rate must be a positive int, got 0
    """

    data: Any
    sample_rate: int

    def __post_init__(self):
        if not isinstance(self.sample_rate, int) or self.sample_rate <= 0:
            raise ValueError(f"Audio: sample_rate must be a positive int, got {self.sample_rate!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Captioned:
    """An image or video (or a batch of them) with its caption: one ``str`` for the whole
    value, or one per item of a batch (``[N, H, W, C]`` images, ``[N, T, H, W, C]`` videos).

    Writers that declare ``captions = True`` (all of fxtrain's) take it in ``write_images``
    and ``write_videos``; ``fx.callbacks.log_media`` writes the caption beside the image as a
    text ``<name>/caption`` for writers that do not (clu's).

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> writer = fx.logging.JsonlWriter(pathlib.Path(tmp.name) / "metrics.jsonl")
        >>> digits = torch.rand(2, 8, 8, 1)
        >>> writer.write_images(10, {"digits": fx.logging.Captioned(digits, ["3", "7"])})
        >>> writer.close()
        >>> [e["values"]["digits"]["caption"] for e in fx.logging.read_jsonl(writer.path)]
        [['3', '7']]
        >>> tmp.cleanup()
        >>> fx.logging.Captioned(digits, 3)
        Traceback (most recent call last):
            ...
        TypeError: Captioned: caption must be a str or a list of str (one per image), got 3
    """

    value: Any
    caption: str | Sequence[str]

    def __post_init__(self):
        caption = self.caption
        if not isinstance(caption, str):
            if not isinstance(caption, Sequence) or not caption or \
                    not all(isinstance(c, str) for c in caption):
                raise TypeError("Captioned: caption must be a str or a list of str (one per "
                                f"image), got {caption!r}")
            object.__setattr__(self, "caption", tuple(caption))


def uncaptioned(value: Any) -> tuple[Any, str | tuple[str, ...] | None]:
    """``(value, caption)`` of a ``Captioned``; ``(value, None)`` of anything else."""
    if isinstance(value, Captioned):
        return value.value, value.caption
    return value, None


def caption_list(key: str, caption: str | Sequence[str], n: int) -> list[str]:
    """One caption per item of a batch of ``n``: a ``str`` for each, or the list checked to
    be ``n`` long (a ValueError naming ``key`` otherwise)."""
    if isinstance(caption, str):
        return [caption] * n
    if len(caption) != n:
        raise ValueError(f"{key!r} has {n} images or videos but {len(caption)} captions; give "
                         "one caption (a str) or one per item")
    return list(caption)


def caption_markdown(caption: str | Sequence[str]) -> str:
    """A caption as markdown text: a ``str`` as it is, a list as ``- i: caption`` lines (the
    order of a batch's items: row by row in TensorBoard's grid)."""
    if isinstance(caption, str):
        return caption
    return "\n".join(f"- {i}: {c}" for i, c in enumerate(caption))


def is_figure(value: Any) -> bool:
    """Whether ``value`` is a matplotlib figure (without importing matplotlib)."""
    return type(value).__module__.startswith("matplotlib") and type(value).__name__ == "Figure"


def figure_pixels(figure: Any, *, close: bool = True) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a matplotlib figure, drawn off screen; ``close`` releases it
    from pyplot (figures made with ``plt.figure`` otherwise stay alive for ever)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(figure) if not hasattr(figure.canvas, "buffer_rgba") else \
        figure.canvas
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if close:
        import matplotlib.pyplot as plt
        plt.close(figure)
    return pixels


def wav_bytes(clip: np.ndarray, sample_rate: int) -> bytes:
    """A mono clip in [-1, 1] as a 16-bit PCM WAV file (standard library ``wave``)."""
    pcm = (np.clip(np.nan_to_num(np.asarray(clip, np.float32)), -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return buffer.getvalue()


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """An animated GIF of ``[T, H, W, C]`` uint8 frames (C of 1, 3 or 4), through Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("writing videos needs Pillow (pip install pillow)") from e
    c = frames.shape[-1]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    images = [Image.fromarray(f[..., 0] if c == 1 else f, mode) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return buffer.getvalue()
