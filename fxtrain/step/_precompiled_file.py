"""The file ``fx.precompiled`` keeps a compiled step in: verified whole before any of it is used.

A file is a header line (``fxtrain-precompiled-2``, the SHA-256 checksum and the length of the
rest), then the key's line (what the step was made from: ``fxtrain.step._precompile.fingerprint``) and
the body (torch's serialized step). It is written beside its path, flushed to disk and renamed
over it, so a reader never sees half a file. A file that gives no step raises ``Unusable``, whose
text is the warning ``fx.precompiled`` gives, naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .._files import write_whole

MAGIC = b"fxtrain-precompiled-"  # a file begins so, then the number of its format
FORMAT = 2  # format 1 (before issue 46): b"fxtrain-precompiled-1\n", the key's line, the body
HEADER = re.compile(re.escape(MAGIC) + b"%d" % FORMAT
                    + rb" sha256=([0-9a-f]{64}) bytes=([0-9]{1,15})\n")


class Unusable(Exception):
    """The file at a path gives no step: ``str`` is the warning ``fx.precompiled`` gives, naming
    the file and the cause; ``replace``: whether the step compiled instead may be saved over it
    (not over a file fxtrain cannot tell it wrote)."""

    def __init__(self, path: Path, cause: str, replace: bool):
        then = ("saved over it" if replace else "trains, but is not saved: fxtrain never "
                "overwrites a file it cannot read as its own (give another path, or delete it)")
        super().__init__(f"fx.precompiled: {path} {cause}; the step is compiled again, {then}")
        self.replace = replace


def pack(key: str, body: bytes) -> bytes:
    """A file's bytes: a header line (the format, the payload's SHA-256 and length), then the
    payload: the key's line and the body (``aot.serialize``'s)."""
    payload = key.encode() + b"\n" + body
    digest = hashlib.sha256(payload).hexdigest()
    return b"%s%d sha256=%s bytes=%d\n" % (MAGIC, FORMAT, digest.encode(), len(payload)) + payload


def unpack(path: Path, data: bytes) -> tuple[bytes, bytes]:
    """The key and the body of the bytes ``data`` read from ``path``, verified whole (length and
    checksum) before any of it is used; else raises ``Unusable`` saying why."""
    if not data.startswith(MAGIC):
        raise Unusable(path, "is empty" if not data else "is not a file fxtrain.precompiled "
                       "wrote", replace=not data)
    version = re.match(rb"[0-9]{1,9}", data[len(MAGIC):])
    if version is not None and int(version[0]) != FORMAT:  # 1: no length, no checksum
        raise Unusable(path, f"was written in fxtrain.precompiled's file format {int(version[0])} "
                       f"(this fxtrain reads format {FORMAT})", replace=True)
    header = HEADER.match(data)
    if header is None:
        raise Unusable(path, "is damaged (its header is unreadable)", replace=True)
    payload, length = data[header.end():], int(header[2])
    if len(payload) != length:
        size = "truncated" if len(payload) < length else "longer than its header says"
        raise Unusable(path, f"is damaged ({size}: {len(payload)} bytes after the header, "
                       f"{length} written)", replace=True)
    if hashlib.sha256(payload).hexdigest().encode() != header[1]:
        raise Unusable(path, "is damaged (its contents do not match its SHA-256 checksum)",
                       replace=True)
    key, _, body = payload.partition(b"\n")
    return key, body


def read(path: Path) -> tuple[bytes, bytes] | None:
    """The key and the body of the file at ``path``, verified whole; None when there is none;
    raises ``Unusable`` for a file that cannot give them (damaged, not fxtrain's, unreadable, a
    folder)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as e:
        raise Unusable(path, "is a folder, not a file", replace=False) from e
    except OSError as e:  # a file fxtrain may not read
        raise Unusable(path, f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                       replace=False) from e
    return unpack(path, data)


write = write_whole  # the file whole or not at all, flushed to disk (fxtrain._files)
