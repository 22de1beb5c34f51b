"""``CsvWriter``: numbers and texts as rows of a CSV file, ``step,time,name,value``.

One row per value (a long table), appended and flushed at every write: the keys may change from
one write to the next (an evaluation's metrics, a monitor's), a resumed run appends to the same
file, and a process killed mid-write loses at most the row being written. ``read_csv`` gives
each series back; spreadsheet tools and pandas read the file as is (pandas'
``pivot_table(index="step", columns="name", values="value")`` makes it wide). Media and
histograms have no place in a table: they are skipped (the TensorBoard writer keeps them).
Hyperparameters go to ``hparams.json`` beside the file.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .jsonl import _drop_torn_line
from .values import scalar_values

COLUMNS = ("step", "time", "name", "value")


class CsvWriter:
    """Appends rows to ``path`` (parent directories are created; a new file gets the header).

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "metrics.csv"
        >>> writer = fx.logging.CsvWriter(path)
        >>> writer.write_scalars(10, {"loss": torch.tensor(0.25), "accuracy": 0.5})
        >>> writer.write_scalars(20, {"loss": 0.125})
        >>> writer.close()
        >>> fx.logging.read_csv(path)["loss"]
        [(10, 0.25), (20, 0.125)]
        >>> tmp.cleanup()
    """

    def __init__(self, path: str | Path):
        self._warned: set[str] = set()  # keys warned about as non-finite
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_line(self.path, "CsvWriter")
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._rows = csv.writer(self._file)
        if new:
            self._rows.writerow(COLUMNS)
            self._file.flush()

    def _write(self, step: int, values: Mapping[str, Any]) -> None:
        now = time.time()
        self._rows.writerows((int(step), f"{now:.3f}", k, v) for k, v in values.items())
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write(step, {k: repr(v) if math.isfinite(v) else str(v)
                           for k, v in scalar_values(scalars, self._warned).items()})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._write(step, {k: str(v) for k, v in texts.items()})

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass  # no place in a table (see the module)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        with open(self.path.with_name("hparams.json"), "w", encoding="utf-8") as f:
            json.dump(dict(hparams), f, indent=1, default=str)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_csv(path: str | Path) -> dict[str, list[tuple[int, Any]]]:
    """Each series of a ``CsvWriter`` file: ``{name: [(step, value), ...]}`` in file order,
    numbers as floats, texts as strings."""
    series: dict[str, list[tuple[int, Any]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                value: Any = float(row["value"])
            except ValueError:
                value = row["value"]
            series.setdefault(row["name"], []).append((int(row["step"]), value))
    return series
