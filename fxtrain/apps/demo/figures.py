"""The demo's figures: a grid of predictions, a confusion matrix and the loss curve.

Figures are ``matplotlib.figure.Figure`` objects drawn off screen (Agg), never pyplot's, so
nothing depends on a display or on global figure state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...logging.jsonl import read_jsonl

__all__ = ["prediction_grid", "confusion_figure", "read_curves", "loss_curve"]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("fxtrain demo draws its figures with matplotlib: "
                          "pip install 'fxtrain[demo]'") from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def prediction_grid(images: np.ndarray, predicted: Sequence[int], true: Sequence[int],
                    columns: int = 8):
    """Grey-scale images ``[N, H, W]`` titled with their predicted class: green when right,
    red with the true class when wrong."""
    rows = math.ceil(len(images) / columns)
    fig = _figure(columns * 0.9, rows * 1.05)
    for i, (image, p, t) in enumerate(zip(images, predicted, true, strict=True)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{p}" if p == t else f"{p} (is {t})", fontsize=8,
                     color="tab:green" if p == t else "tab:red")
        ax.axis("off")
    return fig


def confusion_figure(counts: np.ndarray, title: str = "confusion matrix"):
    """A count matrix (rows: true class, columns: predicted) with each cell's count."""
    counts = np.asarray(counts)
    n = len(counts)
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    top = counts.max() if counts.size else 0
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > top / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.tick_params(labelsize=7)
    return fig


def read_curves(jsonl: str | Path, keys: Sequence[str]) -> dict[str, tuple[list, list]]:
    """``{key: (steps, values)}`` from a ``JsonlWriter`` file, sorted by step.

    A resumed run writes again the steps between its checkpoint and the interruption; the last
    line for a step wins, so the curve is the run's, once.
    """
    curves: dict[str, dict[int, float]] = {k: {} for k in keys}
    for event in read_jsonl(jsonl):
        if event.get("kind") != "scalars" or event.get("step") is None:
            continue
        for k in keys:
            if k in event["values"]:
                curves[k][event["step"]] = float(event["values"][k])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in curves.items()}


def loss_curve(jsonl: str | Path, png: str | Path, title: str,
               keys: Sequence[str] = ("train/loss", "eval/loss")) -> Path:
    """Plots ``keys`` from the run's JSONL log against the step and saves a PNG at ``png``."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    curves = {k: v for k, v in read_curves(jsonl, keys).items() if v[0]}
    for key, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log" if curves else "linear")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(png)  # a reader never sees half a file
    return png
