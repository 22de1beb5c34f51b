"""Writers that wrap writers: ``MultiWriter`` fans out, ``AsyncWriter`` moves writing to a thread.

Any object with clu's ``MetricWriter`` methods is a writer, so these wrap clu's writers too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .writer import takes_binned_histograms, takes_captions


class MultiWriter:
    """Writes every event to each of ``writers``, in order.

    Examples:
        >>> import logging, pathlib, sys, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = logging.getLogger("fxtrain.example")
        >>> logger.addHandler(logging.StreamHandler(sys.stdout))
        >>> logger.setLevel(logging.INFO)
        >>> logger.propagate = False
        >>> path = pathlib.Path(tmp.name) / "metrics.jsonl"
        >>> writer = fx.logging.MultiWriter([fx.logging.ConsoleWriter(logger),
        ...                                  fx.logging.JsonlWriter(path)])
        >>> writer.write_scalars(5, {"loss": 0.5})
        step 5 | loss=0.5
        >>> writer.close()
        >>> logger.handlers.clear()
        >>> tmp.cleanup()
    """

    def __init__(self, writers: Sequence[Any]):
        self.writers = tuple(writers)

    @property
    def binned_histograms(self) -> bool:
        """Whether every writer takes ``fx.logging.Histogram`` values."""
        return all(takes_binned_histograms(w) for w in self.writers)

    @property
    def captions(self) -> bool:
        """Whether every writer takes ``fx.logging.Captioned`` images and videos."""
        return all(takes_captions(w) for w in self.writers)

    def _each(self, method: str, *args, **kwargs) -> None:
        for w in self.writers:
            getattr(w, method)(*args, **kwargs)

    def write_scalars(self, step, scalars):
        self._each("write_scalars", step, scalars)

    def write_images(self, step, images):
        self._each("write_images", step, images)

    def write_videos(self, step, videos):
        self._each("write_videos", step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        self._each("write_audios", step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self._each("write_texts", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self._each("write_histograms", step, arrays, num_buckets=num_buckets)

    def write_hparams(self, hparams):
        self._each("write_hparams", hparams)

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")


class AsyncWriter:
    """Runs ``writer``'s writes on one worker thread, in order.

    The caller never waits for the disk. Values are handed over as they are: tensors are read by
    the worker (device tensors are copied to the host first by the wrapped writer). An error in
    the worker is raised again on the next call; ``flush`` waits until everything queued is
    written.

    Examples:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "metrics.jsonl"
        >>> writer = fx.logging.AsyncWriter(fx.logging.JsonlWriter(path))
        >>> for step in range(3):
        ...     writer.write_scalars(step, {"loss": 1.0 / (step + 1)})
        >>> writer.flush()
        >>> [event["step"] for event in fx.logging.read_jsonl(path)]
        [0, 1, 2]
        >>> writer.close()
        >>> tmp.cleanup()
    """

    def __init__(self, writer: Any, max_queue: int = 1000):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fxtrain-writer", daemon=True)
        self._thread.start()

    @property
    def binned_histograms(self) -> bool:
        """Whether the wrapped writer takes ``fx.logging.Histogram`` values."""
        return takes_binned_histograms(self.writer)

    @property
    def captions(self) -> bool:
        """Whether the wrapped writer takes ``fx.logging.Captioned`` images and videos."""
        return takes_captions(self.writer)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # kept for the caller's next call
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"AsyncWriter: writing with {type(self.writer).__name__} "
                               f"failed: {error}") from error

    def _submit(self, fn: Callable, *args, **kwargs) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("AsyncWriter is closed")
        self._queue.put(lambda: fn(*args, **kwargs))

    def write_scalars(self, step, scalars):
        self._submit(self.writer.write_scalars, step, dict(scalars))

    def write_images(self, step, images):
        self._submit(self.writer.write_images, step, dict(images))

    def write_videos(self, step, videos):
        self._submit(self.writer.write_videos, step, dict(videos))

    def write_audios(self, step, audios, *, sample_rate):
        self._submit(self.writer.write_audios, step, dict(audios), sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self._submit(self.writer.write_texts, step, dict(texts))

    def write_histograms(self, step, arrays, num_buckets=None):
        self._submit(self.writer.write_histograms, step, dict(arrays), num_buckets=num_buckets)

    def write_hparams(self, hparams):
        self._submit(self.writer.write_hparams, dict(hparams))

    def flush(self):
        """Waits until every queued write is done, then flushes the wrapped writer."""
        self._submit(self.writer.flush)
        self._queue.join()
        self._raise()

    def close(self):
        if self._thread.is_alive():
            self._submit(self.writer.close)
            self._queue.put(None)
            self._thread.join()
        self._raise()
