"""The C++ libraries Inductor builds on the CPU, for ``fx.precompiled``: neither torch's
precompiled step nor its portable compile caches carry them, so a process whose Inductor cache is
empty builds them all again when it loads a step (the step's kernels, its ``cpp_wrapper`` module,
and the probes of the CPU's vector instructions Inductor compiles before any of them: g++ for
seconds each, most of such a warm start).

Checked on torch 2.11.0, 2.12.0, 2.13.0, 2.14.1 and 2.15.0 (tests/unit/test_precompile.py).
Private: Inductor's cache folder (``torch._inductor.runtime.cache_dir_utils.cache_dir``) and its
layout: a library is
``<2 characters>/<key>.so`` there, its key a hash of its C++ source and of the whole command that
builds it (compiler, flags, the vector instructions, include paths), and Inductor builds one only
where none is there. ``put`` places the carried ones there before torch loads the step, never over
a file that exists, so a library is taken only where this process's Inductor would have built that
same file from the same source and command; elsewhere (another torch, compiler or CPU) its key
differs and Inductor builds its own as usual.

The key holds the command's text, not what it meant on the machine that ran it: on x86 Linux
Inductor builds with ``-march=native``, the instructions of the CPU it runs on, so a file made on
an AVX-512 machine and read on an AVX2 one with the same paths has the same keys and its
libraries would stop the process at their first AVX-512 instruction. ``machine`` stamps what a
library depends on beyond its key (the CPU's instruction flags, the compiler's file, the C
library's version); a file's libraries are put only on a machine of the same stamp.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_]{1,8}/[A-Za-z0-9_.]{1,250}\.so")  # relative, no ".."


def folder() -> Path:
    """This process's Inductor cache folder (``TORCHINDUCTOR_CACHE_DIR`` or torch's default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


@functools.cache
def machine() -> str:
    """What this process's libraries depend on beyond Inductor's key, as a line of JSON: a digest
    of the CPU's instruction flags (what ``-march=native`` expands to), the C++ compiler's
    resolved path, size and modification time (its version is not in the key, only its name),
    and the C library's version. Equal stamps: a library built on one loads and runs on the
    other."""
    return json.dumps({"cpu": _cpu_flags(), "cxx": _compiler(),
                       "libc": " ".join(platform.libc_ver()) or platform.system()})


def _cpu_flags() -> str:
    """A digest of the CPU's instruction flags (Linux's ``/proc/cpuinfo``; elsewhere the
    processor's name)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = next((line.split(":", 1)[1].split() for line in lines
                  if line.split(":", 1)[0].strip() in ("flags", "Features")), None)
    text = " ".join(sorted(flags)) if flags else platform.machine() + " " + platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compiler() -> str:
    """The C++ compiler Inductor runs (its own search, ``get_cpp_compiler``): resolved path,
    size, mtime; "none" where Inductor finds none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        found = shutil.which(get_cpp_compiler())
    except RuntimeError:  # InvalidCxxCompiler: Inductor cannot compile here either
        return "none"
    if not found:
        return "none"
    real = os.path.realpath(found)
    stat = os.stat(real)
    return f"{real} {stat.st_size} {stat.st_mtime_ns}"


def mark() -> tuple[float, frozenset[Path]]:
    """Now, and the libraries of the cache folder this process has loaded so far: what
    ``made_since`` counts from."""
    return time.time(), frozenset(_mapped(folder()))


def made_since(since: tuple[float, frozenset[Path]]) -> dict[str, bytes]:
    """The libraries of the cache folder built or first loaded into this process since
    ``since`` (``mark``'s), by name relative to the folder: what a step compiled in between
    needs (one found in the cache and loaded before, by an earlier compile, is left out)."""
    start, before = since
    root = folder()
    loaded = _mapped(root) - before
    found = {}
    for path in root.glob("*/*.so"):
        name = path.relative_to(root).as_posix()
        try:
            if NAME.fullmatch(name) and (path.stat().st_mtime >= start or path in loaded):
                found[name] = path.read_bytes()
        except OSError:  # removed meanwhile: not carried
            continue
    return found


def _mapped(root: Path) -> set[Path]:
    """The files under ``root`` mapped into this process (Linux's ``/proc/self/maps``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    prefix = str(root) + os.sep
    paths = (line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6)
    return {Path(path) for path in paths if path.startswith(prefix)}


def put(libraries: dict[str, bytes]) -> None:
    """Each library into the cache folder where no file of its name is there (each written
    beside and renamed into place, so a concurrent build reads a whole file or none)."""
    root = folder()
    for name, data in libraries.items():
        if not NAME.fullmatch(name):
            raise ValueError(f"not a name of Inductor's libraries: {name!r}")
        path = root / name
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
