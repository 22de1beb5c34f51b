"""What a writer is: clu's ``MetricWriter`` methods, declared as a ``typing.Protocol``.

Any object with these methods is a writer: fxtrain's (``TensorBoardWriter``, ``JsonlWriter``,
``ConsoleWriter``, ``WandbWriter``, ``MultiWriter``, ``AsyncWriter``) and clu's own, which know
nothing of this class. Structural typing, so nothing has to inherit from it; ``isinstance``
checks the methods are there (not their signatures).

Capability flags, optional attributes a writer may set:

- ``binned_histograms`` (bool, default False): ``write_histograms`` also takes
  ``fx.logging.Histogram`` values (binned on the device, so a large tensor is never copied to
  the host). Callbacks send other writers bin-centre samples instead.
- ``captions`` (bool, default False): ``write_images`` and ``write_videos`` also take
  ``fx.logging.Captioned`` values. ``log_media`` writes other writers' captions as texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Writer(Protocol):
    """A sink for metrics and media, keyed by step (clu's ``MetricWriter`` interface).

    Examples:
        A class with the nine methods is a writer, without inheriting from this one:

        >>> class PrintWriter:
        ...     def write_scalars(self, step, scalars):
        ...         print(step, dict(scalars))
        ...     def write_images(self, step, images): pass
        ...     def write_videos(self, step, videos): pass
        ...     def write_audios(self, step, audios, *, sample_rate): pass
        ...     def write_texts(self, step, texts): pass
        ...     def write_histograms(self, step, arrays, num_buckets=None): pass
        ...     def write_hparams(self, hparams): pass
        ...     def flush(self): pass
        ...     def close(self): pass
        >>> isinstance(PrintWriter(), fx.logging.Writer)
        True
        >>> PrintWriter().write_scalars(10, {"loss": 0.25})
        10 {'loss': 0.25}
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     writer = fx.logging.JsonlWriter(f"{d}/metrics.jsonl")
        ...     print(isinstance(writer, fx.logging.Writer))
        ...     writer.close()
        True
        >>> isinstance(object(), fx.logging.Writer)
        False
    """

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes numbers (Python, numpy or 0-d tensors), one series per key."""

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Writes images, ``[N, H, W, C]`` or ``[H, W, C]``, floats in [0, 1] or uint8."""

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        """Writes videos, ``[N, T, H, W, C]``, floats in [0, 1] or uint8."""

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """Writes audio clips, ``[N, T]`` or ``[T]``, values in [-1, 1]."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text (markdown where the backend renders it)."""

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: int | Mapping[str, int] | None = None) -> None:
        """Writes histograms of raw values (and of ``Histogram`` values where
        ``binned_histograms`` is set); ``num_buckets`` is one count, or one per key."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the run's hyperparameters, once."""

    def flush(self) -> None:
        """Makes everything written so far durable (on disk, or sent)."""

    def close(self) -> None:
        """Flushes and releases the writer; it is not used after."""


WRITER_METHODS = tuple(name for name in Writer.__dict__ if name.startswith(("write_", "flush",
                                                                              "close")))


def check_writer(writer: Any, who: str, *methods: str) -> None:
    """Raises a TypeError naming what ``writer`` lacks of ``methods`` (all of ``Writer``'s when
    none are given); ``who`` names the caller in the message.

    Examples:
        >>> from fxtrain.logging.writer import check_writer
        >>> class Scalars:
        ...     def write_scalars(self, step, scalars): pass
        >>> check_writer(Scalars(), "log_metrics", "write_scalars")  # enough for log_metrics
        >>> check_writer(Scalars(), "log_hparams", "write_hparams", "write_texts")
        Traceback (most recent call last):
        ...
        TypeError: log_hparams: Scalars is not a writer: it has no write_hparams, write_texts
        (use fx.logging.TensorBoardWriter, JsonlWriter, ConsoleWriter, or any clu MetricWriter)
    """
    missing = [m for m in (methods or WRITER_METHODS) if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(f"{who}: {type(writer).__name__} is not a writer: it has no "
                        f"{', '.join(missing)} (use fx.logging.TensorBoardWriter, JsonlWriter, "
                        "ConsoleWriter, or any clu MetricWriter)")


def client(module: str, who: str, extra: str) -> Any:
    """The tracker's client package ``module`` for the writer ``who``, imported when the writer
    is made; a missing one is an ImportError naming the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{who} needs {module}: pip install 'fxtrain[{extra}]'") from e


def refuse_credentials(who: str, kwargs: Mapping[str, Any], names: tuple[str, ...],
                       where: str) -> None:
    """Raises a ValueError when ``kwargs`` (a tracking client's arguments) carry one of the
    credentials ``names``: a key passed in code ends up in configs, notebooks and logs, so the
    client reads it from ``where`` (its environment variable or config file) instead.

    Examples:
        >>> from fxtrain.logging.writer import refuse_credentials
        >>> refuse_credentials("CometWriter", {"project_name": "p"}, ("api_key",), "COMET_API_KEY")
        >>> refuse_credentials("CometWriter", {"api_key": "..."}, ("api_key",), "COMET_API_KEY")
        Traceback (most recent call last):
        ...
        ValueError: CometWriter: do not pass api_key; set it in COMET_API_KEY, where the client
        reads it (fxtrain never holds credentials)
    """
    given = sorted(set(kwargs) & set(names))
    if given:
        raise ValueError(f"{who}: do not pass {', '.join(given)}; set it in {where}, where the "
                         "client reads it (fxtrain never holds credentials)")


def takes_binned_histograms(writer: Any) -> bool:
    """Whether ``writer`` declares the ``binned_histograms`` capability.

    Examples:
        >>> from fxtrain.logging.writer import takes_binned_histograms
        >>> takes_binned_histograms(fx.logging.JsonlWriter), takes_binned_histograms(object())
        (True, False)
    """
    return bool(getattr(writer, "binned_histograms", False))


def takes_captions(writer: Any) -> bool:
    """Whether ``writer`` declares the ``captions`` capability (takes ``fx.logging.Captioned``
    images and videos).

    Examples:
        >>> from fxtrain.logging.writer import takes_captions
        >>> takes_captions(fx.logging.TensorBoardWriter), takes_captions(object())
        (True, False)
    """
    return bool(getattr(writer, "captions", False))
