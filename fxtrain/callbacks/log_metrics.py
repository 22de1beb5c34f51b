"""``log_metrics`` and ``log_eval_metrics``: step and evaluation metrics to a writer.

``log_metrics`` keeps each step's metric tensors as they come (no device work, no sync) and,
every ``every`` steps, averages them on device and reads the averages in one transfer: one
host sync per interval. Writers get Python floats, so any writer works (clu's included).

Open intervals are also written when a checkpoint is saved and at train_end, so a run resumed
from any checkpoint writes the same values at the same steps as the uninterrupted run,
although the window itself is not part of the state.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..logging.numbers import is_number, read_floats
from ..logging.values import as_array, markdown_table
from ..logging.writer import check_writer
from ..metrics._means import Means
from .combinators import periodic, rank_zero
from .core import NOTHING, Callback, asks_to_log


def _eval_scalars(metrics: Mapping[str, Any], who: str, warned: set) -> dict[str, Any]:
    out = {}
    for k, v in (metrics or {}).items():
        if not is_number(v):
            if k not in warned:
                warned.add(k)
                warnings.warn(f"{who}: eval metric {k!r} has shape {tuple(v.shape)}, not one "
                              "number; log_eval_metrics writes it (per class, or as a table)",
                              stacklevel=4)
            continue
        out[k] = v
    return out


def log_metrics(writer: Any, every: int = 50, *, train_prefix: str = "train/",
                eval_prefix: str | None = "eval/", name: str = "log_metrics") -> Callback:
    """Writes step metrics averaged over every ``every`` steps, and each evaluation's metrics.

    Step metrics (loss, grad_norm, learning_rate, the loss function's aux values...) are
    averaged on device over the interval and read in one transfer when it ends; nothing is
    read between. A ``Control(log=True)`` from another callback writes the open interval at
    the next step. Runs on rank 0 only.

    Args:
      writer: any writer with ``write_scalars`` (fxtrain's, clu's); it is flushed at train_end,
        not closed.
      every: steps per interval.
      train_prefix: prepended to step metric names.
      eval_prefix: prepended to eval metric names; None leaves evaluations to other callbacks
        (``log_eval_metrics``).
      name: the callback's name.

    Examples:
        >>> import tempfile
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> x = torch.randn(32, 2)
        >>> batch = (x, x.sum(1, keepdim=True))
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = fx.logging.JsonlWriter(f"{d}/metrics.jsonl")  # or TensorBoardWriter
        ...     state = fx.fit(state, fx.make_train_step(loss_fn), fx.data.Batches(batch, 4),
        ...                    max_steps=4, eval_step=fx.make_eval_step(loss_fn),
        ...                    eval_data=[batch], eval_every=4,
        ...                    callbacks=[fx.callbacks.log_metrics(writer, every=2)])
        ...     writer.close()
        ...     for line in fx.logging.read_jsonl(f"{d}/metrics.jsonl"):
        ...         print(line["step"], sorted(line["values"]))
        2 ['train/grad_norm', 'train/learning_rate', 'train/loss']
        4 ['train/grad_norm', 'train/learning_rate', 'train/loss']
        4 ['eval/loss']
    """
    due = periodic(every, "log_metrics")
    check_writer(writer, "log_metrics", "write_scalars")
    window = Means(who="log_metrics")
    warned: set[str] = set()

    def write(step: int) -> None:
        if window:  # the interval's means, read in one transfer
            means = window.take()
            writer.write_scalars(step, read_floats({train_prefix + k: v
                                                    for k, v in means.items()}))

    def fn(state, event):
        kind = event.kind
        if kind == "train_begin":  # a new fit call starts a new interval
            window.take()
        elif kind == "step_end":  # the per-step path: keep the metrics, nothing else
            window.add(event.metrics or {})
            if due(event.step) or asks_to_log(event.metrics):
                write(event.step)
        elif kind == "eval_end":
            if eval_prefix is not None:
                values = _eval_scalars(event.metrics, "log_metrics", warned)
                if values:
                    writer.write_scalars(event.step, read_floats({eval_prefix + k: v
                                                            for k, v in values.items()}))
        elif kind in ("checkpoint", "train_end"):
            write(event.step)  # the open interval: a resumed run starts a new one here too
            if kind == "train_end":
                writer.flush()
        return state, NOTHING

    return rank_zero(Callback(name, None, fn, host=True, kinds=(
        "train_begin", "step_end", "eval_end", "checkpoint", "train_end")))


def log_eval_metrics(writer: Any, *, prefix: str = "eval/",
                     name: str = "log_eval_metrics") -> Callback:
    """Writes each evaluation's metrics, one entry per metric, whatever their shape.

    Numbers (and ``fx.metrics`` values that compute to one) are scalars; a vector (per-class
    accuracy) is one scalar per index, ``<name>/<i>``; a matrix (a confusion matrix) is a
    markdown table under ``<name>`` and a grey-scale image scaled to its maximum; higher ranks
    are histograms. A Collection's metrics arrive as ``<collection key>/<metric>``. Runs on
    rank 0 only.

    Examples:
        >>> class Show:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, {k: round(v, 4) for k, v in scalars.items()})
        ...     def write_texts(self, step, texts):
        ...         print(texts["eval/confusion"])
        ...     def write_images(self, step, images):
        ...         print({k: v.shape for k, v in images.items()})
        ...     def write_histograms(self, step, arrays, num_buckets=None):
        ...         pass
        >>> metrics = {"loss": torch.tensor(0.25), "recall": torch.tensor([0.8, 1.0]),
        ...            "confusion": torch.tensor([[4, 1], [0, 5]])}
        >>> cb = fx.callbacks.log_eval_metrics(Show())
        >>> _ = fx.callbacks.fold([cb], None, fx.Event("eval_end", 100, metrics=metrics))
        100 {'eval/loss': 0.25, 'eval/recall/0': 0.8, 'eval/recall/1': 1.0}
        | | 0 | 1 |
        |---|---|---|
        | **0** | 4 | 1 |
        | **1** | 0 | 5 |
        {'eval/confusion': (2, 2, 1)}
    """
    check_writer(writer, "log_eval_metrics", "write_scalars", "write_texts", "write_images",
                  "write_histograms")

    def fn(state, event):
        numbers, texts, images, hists = {}, {}, {}, {}
        for k, v in (event.metrics or {}).items():
            key = prefix + k
            if is_number(v):
                numbers[key] = v
                continue
            arr = as_array(v).astype(np.float64)
            if arr.ndim == 1:
                numbers.update({f"{key}/{i}": x for i, x in enumerate(arr.tolist())})
            elif arr.ndim == 2:
                texts[key] = markdown_table(arr)
                top = np.nanmax(np.abs(arr)) if arr.size else 0.0
                images[key] = (np.abs(arr) / top if top > 0 else np.zeros_like(arr))[..., None]
            else:
                hists[key] = arr
        for method, values in (("write_scalars", read_floats(numbers)), ("write_texts", texts),
                               ("write_images", images), ("write_histograms", hists)):
            if values:
                getattr(writer, method)(event.step, values)
        return state, NOTHING

    return rank_zero(Callback(name, None, fn, kinds=("eval_end",), host=True))

