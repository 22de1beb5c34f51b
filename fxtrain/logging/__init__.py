"""Writers with clu's ``MetricWriter`` methods: ``write_scalars``, ``write_images``,
``write_videos``, ``write_audios``, ``write_texts``, ``write_histograms``, ``write_hparams``,
``flush``, ``close``. ``Writer`` declares them as a protocol: any object with these methods is a
writer (clu's included)."""

from .comet import CometWriter as CometWriter
from .compose import AsyncWriter as AsyncWriter
from .compose import MultiWriter as MultiWriter
from .console import ConsoleWriter as ConsoleWriter
from .csvfile import CsvWriter as CsvWriter
from .csvfile import read_csv as read_csv
from .jsonl import JsonlWriter as JsonlWriter
from .jsonl import read_jsonl as read_jsonl
from .media import Audio as Audio
from .media import Captioned as Captioned
from .mlflow import MlflowWriter as MlflowWriter
from .neptune import NeptuneWriter as NeptuneWriter
from .tensorboard import TensorBoardWriter as TensorBoardWriter
from .values import Histogram as Histogram
from .wandb import WandbWriter as WandbWriter
from .writer import Writer as Writer

__all__ = ["Writer", "TensorBoardWriter", "JsonlWriter", "ConsoleWriter", "WandbWriter",
           "CsvWriter", "MlflowWriter", "CometWriter", "NeptuneWriter", "MultiWriter",
           "AsyncWriter", "Histogram", "Audio", "Captioned", "read_jsonl", "read_csv"]
