"""Media values for writers: audio clips with their sample rate, matplotlib figures as pixels."""

from __future__ import annotations

import dataclasses
import io
import wave
from typing import Any

import numpy as np

__all__ = ["Audio", "is_figure", "figure_pixels", "gif_bytes", "wav_bytes"]


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
