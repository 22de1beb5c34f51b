"""The file ``fx.precompiled`` keeps a compiled step in: verified whole before any of it is used.

A file is a header line (``fxtrain-precompiled-4``, the SHA-256 checksum and the length of the
rest), then the key's line (what the step was made from: ``fxtrain.step._precompile.fingerprint``),
the libraries' line (the stamp of the machine that built the C++ libraries Inductor made for the
step, and their names and lengths: ``fxtrain._torch.binaries``), their bytes, and the body
(torch's serialized step or caches). It is written beside its path, flushed to disk and renamed
over it, so a reader never sees half a file. A file that gives no step raises ``Unusable``, whose
text is the warning ``fx.precompiled`` gives, naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

from .._files import write_whole

MAGIC = b"fxtrain-precompiled-"  # a file begins so, then the number of its format
FORMAT = 4  # format 1 (before issue 46): b"fxtrain-precompiled-1\n", the key's line, the body;
# 2 (before issue 62): format 3 without the libraries; 3: the libraries' line a list, no stamp
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


class Stored(NamedTuple):
    """What a file holds: the key, the body, the libraries and the stamp of the machine that
    built them (its reader decides whether they fit this one: ``_precompile._read``)."""

    key: bytes
    body: bytes
    libraries: dict[str, bytes]
    machine: str


def pack(key: str, body: bytes, libraries: dict[str, bytes], machine: str) -> bytes:
    """A file's bytes: a header line (the format, the payload's SHA-256 and length), then the
    payload: the key's line, the libraries' line (``{"machine": machine, "files": [[name,
    length], ...]}``, ``machine`` the stamp of the machine that built them:
    ``binaries.machine()``), their bytes, and the body (``aot.serialize``'s or
    ``caches.save``'s)."""
    index = json.dumps({"machine": machine,
                        "files": [[name, len(data)] for name, data in libraries.items()]})
    payload = b"".join([key.encode(), b"\n", index.encode(), b"\n", *libraries.values(), body])
    digest = hashlib.sha256(payload).hexdigest()
    return b"%s%d sha256=%s bytes=%d\n" % (MAGIC, FORMAT, digest.encode(), len(payload)) + payload


def unpack(path: Path, data: bytes) -> Stored:
    """What the bytes ``data`` read from ``path`` hold, verified whole (length and checksum)
    before any of it is used; else raises ``Unusable`` saying why."""
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
    key, _, rest = payload.partition(b"\n")
    index, _, rest = rest.partition(b"\n")
    try:
        line = json.loads(index)
        built_on = str(line["machine"])
        entries = [(str(name), int(length)) for name, length in line["files"]]
    except (ValueError, TypeError, KeyError) as e:
        raise Unusable(path, "is damaged (its libraries' line is unreadable)", replace=True) from e
    libraries, at = {}, 0
    for name, length in entries:
        libraries[name], at = rest[at:at + length], at + length
    return Stored(key, rest[at:], libraries, built_on)


def read(path: Path) -> Stored | None:
    """What the file at ``path`` holds, verified whole (``unpack``); None when there is none;
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
