"""fx.precompiled's C++ libraries carry the stamp of the machine that built them: Inductor's key
holds its command's text (``-march=native``), not the instructions that text meant where it ran,
so a file read on a machine of another stamp (another CPU, compiler or C library) loads its step
but leaves its libraries out, and Inductor builds its own."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from torch._inductor.utils import fresh_cache

import fxtrain as fx
from fxtrain._torch import binaries
from fxtrain.step import _precompiled_file as stored
from helpers_step import QUICK, loss_fn, setup, so_files, steps

OTHER = json.dumps({"cpu": "0" * 16, "cxx": "/usr/bin/g++ 1 1", "libc": "glibc 2.17"})


def test_the_stamp_names_the_compiler_inductor_runs_and_the_c_library():
    from torch._inductor.cpp_builder import get_cpp_compiler

    stamp = json.loads(binaries.machine())
    real = os.path.realpath(shutil.which(get_cpp_compiler()))
    assert stamp["cxx"].split()[0] == real
    assert stamp["cxx"].split()[1] == str(os.stat(real).st_size)
    assert len(stamp["cpu"]) == 16 and stamp["libc"]
    assert binaries.machine() == binaries.machine()  # one stamp per process


def test_a_file_keeps_its_libraries_and_their_machine_s_stamp(tmp_path):
    libraries = {"ab/one.so": b"\x7fELF one", "cd/two.so": b"\x7fELF two"}
    path = tmp_path / "step.bin"
    path.write_bytes(stored.pack('{"k": 1}', b"body", libraries, machine=OTHER))
    assert stored.read(path) == (b'{"k": 1}', b"body", libraries, OTHER)


def test_a_file_of_the_format_before_the_stamp_is_named_and_replaced(tmp_path):
    """Format 3 had no stamp: its libraries' line was a bare list."""
    payload = b'{"k": 1}\n[["ab/one.so", 3]]\nonebody'

    data = (b"fxtrain-precompiled-3 sha256=%s bytes=%d\n"
            % (hashlib.sha256(payload).hexdigest().encode(), len(payload)) + payload)
    with pytest.raises(stored.Unusable, match=r"format 3 \(this fxtrain reads format 4\)") as e:
        stored.unpack(tmp_path, data)
    assert e.value.replace


def test_libraries_built_on_a_machine_of_another_stamp_are_not_put_and_inductor_builds_its_own(
        tmp_path, monkeypatch):
    """Made here, read as if on another machine: the step loads from the file and trains the
    same bits, none of the file's libraries is put into the empty cache (Inductor builds its
    own, from its own compiler, for its own CPU). The same file read on a machine of its stamp
    puts them all (tests/unit/test_precompile.py: a cold cache builds none)."""
    state, batch = setup()
    path = tmp_path / "step.bin"
    with fresh_cache():
        made = steps(fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK),
                     state, batch)[0]
    _, _, carried, _ = stored.read(path)
    assert carried and json.loads(path.read_bytes().split(b"\n")[2])["machine"] \
        == binaries.machine()
    put = []
    monkeypatch.setattr(binaries, "put", lambda libraries: put.append(dict(libraries)))
    monkeypatch.setattr(binaries, "machine", lambda: OTHER)
    torch._dynamo.reset()
    with fresh_cache():
        again = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
        warm = steps(again, state, batch)[0]
        built = so_files(binaries.folder())
    assert again.loaded is True and put == [{}]
    assert built  # Inductor built the libraries the file carried for another machine
    assert fx.tree_digest(warm) == fx.tree_digest(made)
