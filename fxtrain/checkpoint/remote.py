"""Checkpoints in object storage (``s3://bucket/run``, ``gs://``, any fsspec filesystem).

Object stores have no directories and no rename, so a checkpoint cannot appear whole by being
renamed into place as on a disk. Each one is written as it is on a disk, into a local staging
folder (orbax's files, or each rank's shards), then uploaded object by object under
``<url>/<step>/``, and made visible last by one object, ``<step>/fxtrain-commit.json``: every
file of the checkpoint with its size and CRC-32, sealed with its own. A step without it is not
a checkpoint (a save cut off by a killed process or a server gone away) and is deleted by the
next save; a step with it is read by downloading its files, checking each against the commit,
into a local folder, where the usual reader checks the arrays' own checksums.

Credentials come only from the provider's usual environment and configuration (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/``~/.aws``, ``AWS_ENDPOINT_URL_S3`` for another server);
a URL that carries them is refused, so that no message or log can show them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import file_crc
from .layout import (JSON_ITEM, META, TABLE, DamagedCheckpointError, UnreadableCheckpointError,
                     check_seal, chosen_step, damage, parse_meta, sealed, unreadable)

COMMIT = "fxtrain-commit.json"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs"}


def is_url(location: Any) -> bool:
    """Whether ``location`` names object storage (``scheme://...``, not ``file://``)."""
    if isinstance(location, Url):
        return True
    match = _SCHEME.match(location) if isinstance(location, str) else None
    return bool(match) and match.group(1).lower() not in ("file", "local")


class Url:
    """A location in object storage, joined with ``/`` as a ``Path`` is: what a manager's
    ``directory`` is for a URL (its ``str`` is the URL)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text.rstrip("/")

    def __truediv__(self, name: str) -> Url:
        return Url(f"{self.text}/{name}")

    @property
    def name(self) -> str:
        return self.text.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Url({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Url) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def file_table(folder: Path, names: list[str] | None = None) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of the files under ``folder`` (or of ``names``)."""
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return {n: [(folder / n).stat().st_size, file_crc(folder / n)] for n in names}


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path in it; a clear error when the package for
    the scheme is missing or the URL carries credentials."""
    scheme = _SCHEME.match(url).group(1).lower()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@", url):
        raise ValueError(f"the checkpoint URL {scheme}://...@... carries credentials; give "
                         "them through the provider's environment or configuration (for S3: "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws), "
                         "never in the URL, which is logged")
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"checkpoints at {scheme}:// URLs need fsspec: pip install "
                          "'fxtrain[remote]'") from e
    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:
        package = _PACKAGES.get(scheme, f"fsspec's implementation of {scheme}://")
        raise ImportError(f"checkpoints at {scheme}:// URLs need {package}: pip install "
                          f"{'fxtrain[remote]' if package == 's3fs' else package}") from e
    except ValueError as e:
        raise ValueError(f"{url} is no storage fsspec knows: {e}") from e


def _failure(url: Url, e: BaseException, what: str) -> OSError:
    """A storage operation that failed for the system's reasons (a server gone, no
    permission) as an ``UnreadableCheckpointError``: not damage, so nothing is set aside."""
    return unreadable(url, errno.EIO, f"{what} failed ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''})")


class Store:
    """A manager's directory in object storage: its committed steps, their descriptions,
    uploads, downloads and deletions."""

    def __init__(self, url: str | Url):
        self.url = Url(str(url))
        self.fs, self.root = _filesystem(self.url.text)
        self.root = self.root.rstrip("/")

    def _path(self, *parts: Any) -> str:
        return "/".join([self.root, *map(str, parts)])

    def listing(self) -> list[str]:
        """The names directly under the store's URL, as they are now."""
        self.fs.invalidate_cache(self.root)  # fsspec caches listings; another process may save
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def exists(self, name: str) -> bool:
        """Whether anything is stored under ``<url>/<name>``."""
        return self.fs.exists(self._path(name))

    def check_writable(self) -> None:
        """Raises naming the bucket when it does not exist (fxtrain creates no buckets)."""
        bucket = self.root.split("/", 1)[0]
        try:
            there = self.fs.exists(bucket)
        except Exception as e:
            raise OSError(f"cannot reach {self.url}: {type(e).__name__}: {e}") from e
        if not there:
            raise FileNotFoundError(f"cannot save in {self.url}: the bucket {bucket} does not "
                                    "exist (fxtrain creates no buckets)")

    # -- what is there ---------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        try:
            names = [n for n in self.listing() if n.isdigit()]
            committed = [int(n) for n in names if self.fs.exists(self._path(n, COMMIT))]
        except OSError:
            raise
        except Exception as e:
            raise _failure(self.url, e, "listing the checkpoints") from e
        return sorted(committed)

    def uncommitted(self) -> list[str]:
        """The step prefixes without a commit: saves cut off before they finished."""
        names = [n for n in self.listing() if n.isdigit()]
        return [n for n in names if not self.fs.exists(self._path(n, COMMIT))]

    def commit_of(self, step: int | str) -> dict:
        """The commit of a step: its files with sizes and checksums, and its description's
        path (``DamagedCheckpointError`` when it cannot be read as written)."""
        where = self.url / str(step)
        try:
            raw = self.fs.cat_file(self._path(step, COMMIT))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no checkpoint at {where} (no {COMMIT})") from e
        except Exception as e:
            raise _failure(where, e, f"reading {COMMIT}") from e
        try:
            commit = json.loads(raw)
            if not isinstance(commit, dict) or "files" not in commit:
                raise ValueError(f"{COMMIT} is not an fxtrain commit")
        except ValueError as e:
            raise damage(where, f"its {COMMIT} cannot be read ({e})") from e
        check_seal(where, commit)
        return commit

    def read_meta(self, step: int | str) -> dict:
        """The JSON description of the checkpoint of ``step``."""
        where = self.url / str(step)
        commit = self.commit_of(step)
        name = commit["description"]
        try:
            raw = self.fs.cat_file(self._path(step, name))
        except FileNotFoundError as e:
            raise damage(where, f"its description {name} is missing") from e
        except Exception as e:
            raise _failure(where, e, f"reading {name}") from e
        size, crc = commit["files"][name]
        if len(raw) != size or zlib.crc32(raw) != crc:
            raise damage(where, f"its description {name} differs from what was written")
        return parse_meta(where, raw)

    # -- writing ---------------------------------------------------------------------------

    def clear(self, step: int | str) -> None:
        """Deletes everything under ``step`` (a leftover of a save cut off, or retention's)."""
        path = self._path(step)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(self.root)

    def clear_uncommitted(self) -> None:
        for name in self.uncommitted():
            self.clear(name)

    def upload(self, folder: Path, step: int | str, names: list[str] | None = None) -> None:
        """Uploads the files ``names`` of ``folder`` (all of them by default) under ``step``."""
        names = names if names is not None else sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        for name in names:
            self.fs.put_file(str(folder / name), self._path(step, name))

    def commit(self, step: int | str, files: dict[str, list[int]]) -> None:
        """Makes ``step`` visible: writes its commit, the last object of a checkpoint."""
        description = TABLE if TABLE in files else f"{META}/{JSON_ITEM}"
        if description not in files:
            raise ValueError(f"a checkpoint of step {step} without a description")
        body = sealed({"files": files, "description": description})
        self.fs.pipe_file(self._path(step, COMMIT), json.dumps(body).encode())
        self.fs.invalidate_cache(self.root)

    def save_folder(self, folder: Path, step: int | str) -> None:
        """Uploads a checkpoint written whole in ``folder`` as ``step``, then commits it."""
        files = file_table(folder)
        self.upload(folder, step, list(files))
        self.commit(step, files)

    # -- reading ---------------------------------------------------------------------------

    def download(self, step: int | str, into: Path) -> Path:
        """The checkpoint of ``step`` as a local folder ``into`` (created), every file checked
        against its commit."""
        where = self.url / str(step)
        commit = self.commit_of(step)
        into.mkdir(parents=True, exist_ok=True)
        for name, (size, crc) in sorted(commit["files"].items()):
            local = into / name
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._path(step, name), str(local))
            except FileNotFoundError as e:
                raise damage(where, f"its file {name} is missing") from e
            except Exception as e:
                raise _failure(where, e, f"downloading {name}") from e
            if local.stat().st_size != size:
                raise damage(where, f"its file {name} holds {local.stat().st_size} bytes, "
                                    f"{size} were written (truncated or altered)")
            if file_crc(local) != crc:
                raise damage(where, f"the bytes of its file {name} differ from what was "
                                    "written (CRC-32 mismatch)")
        return into

    def set_aside(self, step: int) -> Url:
        """Moves the (damaged) checkpoint of ``step`` to ``<step>.damaged`` (no longer a step);
        returns where it went."""
        names = set(self.listing())
        new, n = f"{step}.damaged", 1
        while new in names:
            n += 1
            new = f"{step}.damaged.{n}"
        old = self._path(step)
        self.fs.invalidate_cache(old)
        for key in self.fs.find(old):  # object by object: stores have no rename
            self.fs.copy(key, self._path(new) + key[len(old):])
        self.fs.rm_file(self._path(step, COMMIT))  # no longer a step, before the rest goes
        self.clear(step)
        return self.url / new


@contextlib.contextmanager
def local_copy(url: str | Url, step: int | None = None) -> Iterator[Path]:
    """The checkpoint at ``url`` (one checkpoint, or a manager's directory: its ``step``, by
    default the latest) downloaded into a temporary folder, removed afterwards."""
    store, name = _checkpoint_at(url, step)
    with downloaded(store, name) as local:
        yield local


@contextlib.contextmanager
def downloaded(store: Store, name: str | int) -> Iterator[Path]:
    """The checkpoint ``name`` (a step, or ``save``'s name) of ``store`` downloaded into a
    temporary folder, removed afterwards; its errors name it by its URL."""
    name = str(name)
    tmp = Path(tempfile.mkdtemp(prefix="fxtrain-download-"))
    local = tmp / name
    try:
        yield store.download(name, local)
    except (DamagedCheckpointError, UnreadableCheckpointError) as e:  # named by its URL
        raise _renamed(e, str(local), str(store.url / name)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _renamed(error: Exception, local: str, url: str) -> Exception:
    """``error`` (about a downloaded copy) naming the checkpoint by its URL instead."""
    if isinstance(error, OSError) and error.errno is not None:
        new = type(error)(error.errno, error.strerror.replace(local, url))
    else:
        new = type(error)(str(error).replace(local, url))
    new.__dict__.update(error.__dict__)
    return new


def _checkpoint_at(url: str | Url, step: int | None) -> tuple[Store, str]:
    """The store and the name in it of the checkpoint ``url`` names: ``url`` itself when it
    is one checkpoint (``fx.checkpoint.save``'s), else its ``step`` (default: the latest)."""
    url = Url(str(url))
    parent, _, name = url.text.rpartition("/")
    if step is None and "://" in parent:
        store = Store(parent)
        if store.exists(f"{name}/{COMMIT}"):
            return store, name
    store = Store(url)
    return store, str(chosen_step(store.steps(), step, url))


__all__ = ["COMMIT", "DamagedCheckpointError", "Store", "Url", "downloaded", "file_table",
           "is_url", "local_copy"]
