"""fx.precompiled: a train step compiled ahead of time, saved, and loaded by the next process
instead of traced and compiled again (the start-up issue's warm start)."""

import errno
import json
import os
import random
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx
import fxtrain.step._precompile as precompile
from fxtrain.step import _precompiled_file as stored
from fxtrain._torch import aot
from fxtrain.step._precompile import compile_options
from helpers_step import (DAMAGED, KEPT, QUICK, REPLACED, flip, in_a_kernel, loss_fn, setup,
                          so_files, steps)


class Scaled(nn.Module):
    """A setting its forward reads that its repr does not show."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.linear = scale, nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) * self.scale


# the tests of torch's precompiled step itself (its guard check, its refusals, the damaged files
# of that route): torch 2.13 and later. Before, the file keeps torch's compile caches instead, and
# the tests without this mark hold on that route too (torch 2.11).
SAVES = pytest.mark.needs_torch(2, 13, "fx.precompiled saving a compiled step")


def loaded(train_step, path, state, batch, options=QUICK):
    """Whether fx.precompiled loaded the step from ``path`` (after a first call)."""
    step = fx.precompiled(train_step, path, options=options)
    step(state, batch)
    return step.loaded


def test_a_step_of_other_code_or_hyperparameters_is_compiled_again(tmp_path):
    path = tmp_path / "step.bin"
    state, batch = setup()
    assert loaded(fx.make_train_step(loss_fn), path, state, batch) is False
    assert loaded(fx.make_train_step(loss_fn), path, state, batch) is True

    def other_loss(state, params, batch):  # other code: not the saved step
        x, y = batch
        return F.cross_entropy(state.apply(params, x), y) * 2.0

    again = fx.precompiled(fx.make_train_step(other_loss), path, options=QUICK)
    trained = steps(again, state, batch)[0]
    assert again.loaded is False
    reference = torch.compile(fx.make_train_step(other_loss), fullgraph=True)
    assert fx.tree_digest(trained) == fx.tree_digest(steps(reference, state, batch)[0])
    faster, _ = setup(lr=0.5)  # another learning rate: compiled again, never the old one
    assert loaded(fx.make_train_step(other_loss), path, faster, batch) is False
    assert loaded(fx.make_train_step(other_loss), path, faster, batch) is True


def test_the_cpu_default_is_the_cpp_wrapper_and_other_options_compile_again(tmp_path):
    """On the CPU the step's kernels are called from C++ by default (a faster call, trained
    bitwise as torch.compile's Python wrapper does); a file made with other options is not
    used."""
    path = tmp_path / "step.bin"
    state, batch = setup()
    assert compile_options(state) == {"cpp_wrapper": True}
    elsewhere = state.replace(params={k: v.to("meta") for k, v in state.params.items()})
    assert compile_options(elsewhere) == {}  # another device: Inductor's own defaults
    step = fx.precompiled(fx.make_train_step(loss_fn), path)
    trained = steps(step, state, batch)[0]
    reference = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)
    assert fx.tree_digest(trained) == fx.tree_digest(steps(reference, state, batch)[0])
    assert loaded(fx.make_train_step(loss_fn), path, state, batch, options=None) is True
    assert loaded(fx.make_train_step(loss_fn), path, state, batch) is False  # QUICK
    with pytest.raises(TypeError, match="options must be a dict"):
        fx.precompiled(fx.make_train_step(loss_fn), path, options=["cpp_wrapper"])


@SAVES
def test_inputs_the_loaded_step_was_not_made_for_go_to_torch_compile(tmp_path):
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), tmp_path / "step.bin", options=QUICK)
    step(state, batch)
    short = (batch[0][:3], batch[1][:3])  # a short last batch
    reference = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)
    with pytest.warns(UserWarning, match="not made for"):
        got, metrics = step(state, short)
    want, expected = reference(state, short)
    assert fx.tree_digest(got) == fx.tree_digest(want)
    assert torch.equal(metrics["loss"], expected["loss"])


@SAVES
def test_fit_checks_the_guards_of_the_first_call_and_of_other_batches_only(tmp_path,
                                                                             monkeypatch):
    """In fit the state is the step's own output: after the first call only a batch unlike those
    the made step took needs its guard check (here the short last batch of each epoch, which
    goes to torch.compile)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    checks = []
    real = AOTCompiledFunction.guard_check

    def counting(self, *args, **kwargs):
        checks.append(args[1][0].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AOTCompiledFunction, "guard_check", counting)
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    data = fx.data.Batches((x, y), 8, shuffle=False, drop_last=False)  # 8, 8, a short 4
    state = setup()[0]
    step = fx.precompiled(fx.make_train_step(loss_fn), tmp_path / "step.bin", options=QUICK)
    with pytest.warns(UserWarning, match="not made for"):
        got = fx.fit(state, step, data, max_steps=9)
    assert checks == [8, 4, 4, 4]  # the first call, then each short batch
    want = fx.fit(state, torch.compile(fx.make_train_step(loss_fn), fullgraph=True), data,
                  max_steps=9)
    assert fx.tree_digest(got) == fx.tree_digest(want)


def test_fit_trains_with_a_precompiled_step_as_with_the_compiled_one(tmp_path):
    state, batch = setup()
    data = [batch] * 3
    step = fx.precompiled(fx.make_train_step(loss_fn), tmp_path / "step.bin", options=QUICK)
    assert fx.step_spec(step).compiled and fx.step_spec(step).donate is False
    trained = fx.fit(state, step, data, max_steps=3)
    reference = fx.fit(state, torch.compile(fx.make_train_step(loss_fn), fullgraph=True), data,
                       max_steps=3)
    assert fx.tree_digest(trained.params) == fx.tree_digest(reference.params)


def test_a_donating_precompiled_step_gives_up_the_state_it_was_given(tmp_path):
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), tmp_path / "step.bin", donate=True,
                          options=QUICK)
    assert fx.step_spec(step).donate is True
    given = state.replace(params={k: v.clone() for k, v in state.params.items()})
    new, _ = step(given, batch)
    with pytest.raises(fx.DonatedError):
        step(given, batch)
    want, _ = torch.compile(fx.make_train_step(loss_fn), fullgraph=True)(state, batch)
    assert fx.tree_digest(new.params) == fx.tree_digest(want.params)


def test_bad_arguments_are_refused(tmp_path):
    step = fx.make_train_step(loss_fn)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fx.precompiled(step, tmp_path / "missing" / "step.bin")
    with pytest.raises(TypeError, match="not a compiled"):
        fx.precompiled(torch.compile(step), tmp_path / "step.bin")
    with pytest.raises(ValueError, match="donate=None"):
        fx.precompiled(fx.make_train_step(loss_fn, donate=False), tmp_path / "step.bin",
                       donate=True)


def test_a_model_of_other_settings_is_compiled_again(tmp_path):
    path = tmp_path / "step.bin"
    batch = setup()[1]

    def state_with(scale):
        torch.manual_seed(0)
        return fx.TrainState.create(Scaled(scale), fx.optim.sgd(0.1))

    assert loaded(fx.make_train_step(loss_fn), path, state_with(0.25), batch) is False
    assert loaded(fx.make_train_step(loss_fn), path, state_with(0.25), batch) is True
    assert loaded(fx.make_train_step(loss_fn), path, state_with(0.5), batch) is False


@SAVES
def test_a_step_torch_cannot_save_warns_and_trains_under_torch_compile(tmp_path):
    class Local(nn.Linear):  # defined in a function: torch's package refuses its type
        pass

    torch.manual_seed(0)
    state, batch = fx.TrainState.create(Local(4, 3), fx.optim.sgd(0.1)), setup()[1]
    step = fx.precompiled(fx.make_train_step(loss_fn), tmp_path / "step.bin", options=QUICK)
    with pytest.warns(UserWarning, match="cannot save this step"):
        got = steps(step, state, batch)[0]
    assert step.loaded is False and not (tmp_path / "step.bin").exists()
    want = steps(torch.compile(fx.make_train_step(loss_fn), fullgraph=True), state, batch)[0]
    assert fx.tree_digest(got) == fx.tree_digest(want)


def test_where_torch_has_no_precompile_the_file_keeps_its_compile_caches(tmp_path, monkeypatch):
    """Torch before 2.13 (its precompile serves no step: fxtrain._torch.aot; forced here on any
    torch): the first call compiles under torch.compile and saves torch's compile caches with
    the step's key, checksummed as any file; a later step (another process, here a fresh
    Inductor cache) loads them, traces the step again and compiles nothing, trains the same
    bits, and warns of nothing."""
    import warnings

    from torch._inductor.utils import fresh_cache

    monkeypatch.setattr(aot, "AVAILABLE", False)
    state, batch = setup()
    path = tmp_path / "step.bin"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fresh_cache():
            step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
            got = steps(step, state, batch)[0]
        assert step.loaded is False and json.loads(stored.read(path)[0])["route"] == "caches"
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        with fresh_cache():  # nothing but the file's caches
            counters.clear()
            again = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
            warm = steps(again, state, batch)[0]
            assert again.loaded is True
            assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(counters)
            assert not counters["aot_autograd"]["autograd_cache_miss"], dict(counters)
    assert not [w for w in caught if "precompiled" in str(w.message)]
    assert fx.tree_digest(got) == fx.tree_digest(warm)
    want = steps(torch.compile(fx.make_train_step(loss_fn), fullgraph=True,
                               options=QUICK), state, batch)[0]
    assert fx.tree_digest(got) == fx.tree_digest(want)


@pytest.mark.parametrize("route", [pytest.param("aot", marks=SAVES), "caches"])
def test_a_cold_inductor_cache_finds_the_libraries_in_the_file_and_builds_none(route, tmp_path,
                                                                              monkeypatch):
    """On the CPU the file carries the C++ libraries Inductor built for the step (issue 62:
    neither torch's precompiled step nor its caches hold them, so a cold cache built them
    again); a step loaded into an empty Inductor cache finds them there, builds none, and
    trains the same bits. Both routes (the caches one forced here on any torch)."""
    from torch._inductor.utils import fresh_cache

    from fxtrain._torch import binaries

    if route == "caches":
        monkeypatch.setattr(aot, "AVAILABLE", False)
    state, batch = setup()
    path = tmp_path / "step.bin"
    with fresh_cache():
        step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
        made = steps(step, state, batch)[0]
        built = so_files(binaries.folder())
    key, _, libraries, _ = stored.read(path)
    assert json.loads(key).get("route", "aot") == route  # before 2.13: caches alone
    assert built and set(libraries) == built  # every one it built, and no other
    torch._dynamo.reset()
    with fresh_cache():
        again = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
        warm = steps(again, state, batch)[0]
        cache = binaries.folder()
        assert again.loaded is True and so_files(cache) == built
        assert all((cache / name).read_bytes() == data for name, data in libraries.items())
    assert fx.tree_digest(made) == fx.tree_digest(warm)


def test_a_library_is_put_only_under_its_name_in_the_cache_and_never_over_a_file(tmp_path,
                                                                                monkeypatch):
    """fxtrain._torch.binaries.put: a name outside the cache folder's layout is refused before
    anything is written; a file already there is kept as it is."""
    from fxtrain._torch import binaries

    monkeypatch.setattr(binaries, "folder", lambda: tmp_path / "cache")
    (tmp_path / "cache" / "ab").mkdir(parents=True)
    (tmp_path / "cache" / "ab" / "kept.so").write_bytes(b"built here")
    for bad in ("../ab/x.so", "/tmp/x.so", "ab/x.py", "ab/../../x.so", "x.so"):
        with pytest.raises(ValueError, match="not a name of Inductor's libraries"):
            binaries.put({bad: b"elsewhere"})
    binaries.put({"ab/kept.so": b"carried", "cd/new.so": b"carried"})
    assert (tmp_path / "cache" / "ab" / "kept.so").read_bytes() == b"built here"
    assert (tmp_path / "cache" / "cd" / "new.so").read_bytes() == b"carried"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["kept.so", "new.so"]


def test_a_file_naming_a_library_outside_the_cache_is_named_and_loads_nothing(saved, tmp_path,
                                                                             monkeypatch):
    """A whole file (its checksum holds) whose libraries' line names a path outside Inductor's
    cache folder: refused, naming the file, before torch's loader sees it."""
    def never(*args, **kwargs):
        raise AssertionError("reached torch's loader")

    monkeypatch.setattr(aot, "load", never)
    monkeypatch.setattr(precompile.caches, "load", never)
    key, body, _, _ = stored.unpack(tmp_path, saved.data)
    path = tmp_path / "step.bin"
    from fxtrain._torch import binaries

    path.write_bytes(stored.pack(key.decode(), body, {"../../escaped.so": b"x"},
                                 binaries.machine()))
    with pytest.raises(stored.Unusable, match="not a name of Inductor's libraries"):
        precompile._read(path, saved.key, fx.make_train_step(loss_fn))

    assert not (binaries.folder() / "../../escaped.so").exists()


# Damaged files (issue 46): a file that gives no step is named in a warning with the cause, the
# step is compiled again and trains; the file is replaced only where fxtrain can tell it wrote it.

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A clean file of fx.precompiled, made once for the tests of damaged files: its bytes, its
    key (the second line) and the digest of the state its step trained in 2 steps."""
    path = tmp_path_factory.mktemp("clean") / "step.bin"
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
    trained = steps(step, state, batch)[0]
    data = path.read_bytes()
    return SimpleNamespace(data=data, key=data.split(b"\n")[1].decode(),
                           digest=fx.tree_digest(trained))


def lines(data: bytes, n: int) -> int:
    """Where the ``n``-th line of ``data`` ends."""
    end = 0
    for _ in range(n):
        end = data.index(b"\n", end) + 1
    return end


def garbage(n: int) -> bytes:
    return random.Random(0).randbytes(n)


PREVIOUS_FORMAT = b"fxtrain-precompiled-1\n"  # fxtrain's header before issue 46: then key, body
CHECKSUM = re.escape(DAMAGED)
DAMAGES = {  # at the path: (its bytes from the clean file's, the cause named, what is done)
    "a_bit_in_a_kernel": (in_a_kernel, CHECKSUM, REPLACED),
    "truncated": (lambda d: d[:len(d) // 2],
                  r"is damaged \(truncated: \d+ bytes after the header, \d+ written\)", REPLACED),
    "empty": (lambda d: b"", "is empty", REPLACED),
    "garbage_body": (lambda d: d[:lines(d, 2)] + garbage(len(d) - lines(d, 2)), CHECKSUM,
                     REPLACED),
    "garbage": (lambda d: garbage(4096), "is not a file fxtrain.precompiled wrote", KEPT),
    "previous_format": (lambda d: PREVIOUS_FORMAT + d[lines(d, 1):],
                        r"was written in fxtrain.precompiled's file format 1 \(this fxtrain "
                        r"reads format 4\)", REPLACED),
    "format_2": (lambda d: d.replace(b"fxtrain-precompiled-4 ", b"fxtrain-precompiled-2 ", 1),
                 r"was written in fxtrain.precompiled's file format 2 \(this fxtrain "
                 r"reads format 4\)", REPLACED),
    "folder": (None, "is a folder, not a file", KEPT),
    "unreadable": (None, r"cannot be read \(PermissionError: Permission denied\)", KEPT),
}


def contents(folder: Path) -> dict:
    """Every path under ``folder`` and its bytes (None for a folder)."""
    return {p: None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def put(damage: str, path: Path, data: bytes) -> None:
    """``DAMAGES[damage]`` at ``path``, made from the clean file's ``data``."""
    make = DAMAGES[damage][0]
    if damage == "folder":
        path.mkdir()
        (path / "inside.txt").write_text("kept")
    else:
        path.write_bytes(data if damage == "unreadable" else make(data))


def unreadable(path: Path, monkeypatch) -> None:
    """``path`` made a file nobody may read; as root, who reads it anyway, its read refused as
    the OS refuses it to others."""
    path.chmod(0)
    if os.geteuid() == 0:
        real = Path.read_bytes

        def refused(self):
            if self == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", refused)


def precompiled_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("fx.precompiled")]


@SAVES
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_file_that_gives_no_step_is_named_and_the_step_compiled_again(damage, saved, tmp_path,
                                                                        monkeypatch):
    """Each damaged file: one warning naming it and the cause, the step compiled again and
    trained to the clean run's bits; the file replaced by one that loads where fxtrain wrote it,
    else left as it was."""
    path = tmp_path / "step.bin"
    put(damage, path, saved.data)
    before = contents(tmp_path)
    if damage == "unreadable":
        unreadable(path, monkeypatch)
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
    with pytest.warns(UserWarning) as caught:
        trained = steps(step, state, batch)[0]
    if damage == "unreadable":
        monkeypatch.undo()
        path.chmod(0o600)
    _, cause, then = DAMAGES[damage]
    warned = precompiled_warnings(caught)
    assert len(warned) == 1 and re.fullmatch(
        re.escape(f"fx.precompiled: {path} ") + cause + re.escape(f"; {then}"), warned[0]), warned
    assert step.loaded is False and step._fallback is None  # the step compiled ahead trains
    assert fx.tree_digest(trained) == saved.digest
    if then == REPLACED:  # by a whole file, nothing beside it
        assert [p.name for p in tmp_path.iterdir()] == ["step.bin"]
        assert loaded(fx.make_train_step(loss_fn), path, state, batch) is True
    else:
        assert contents(tmp_path) == before


@SAVES
def test_a_whole_file_torch_cannot_load_is_named_and_replaced(saved, tmp_path, monkeypatch):
    """A file whose checksum holds but which torch's loader refuses in this process (here made
    to): named with torch's error, the step compiled again and saved over it."""
    def refused(*args, **kwargs):
        raise RuntimeError("no such step here")

    path = tmp_path / "step.bin"
    path.write_bytes(saved.data)
    monkeypatch.setattr(aot, "load", refused)
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
    with pytest.warns(UserWarning) as caught:
        trained = steps(step, state, batch)[0]
    assert precompiled_warnings(caught) == [
        f"fx.precompiled: {path} cannot be loaded by torch (RuntimeError: no such step here); "
        f"{REPLACED}"]
    assert step.loaded is False and fx.tree_digest(trained) == saved.digest
    monkeypatch.undo()
    assert loaded(fx.make_train_step(loss_fn), path, state, batch) is True


def test_one_flipped_bit_anywhere_in_the_file_is_named_before_anything_is_loaded(saved, tmp_path,
                                                                                 monkeypatch):
    """One bit flipped at every byte of the header and key lines and at a spread of positions
    over the body (about 1500 in all): each file is refused, naming it, before torch's loader
    sees a byte of it (the whole file's checksum is verified first)."""
    def never(*args, **kwargs):
        raise AssertionError("a damaged file reached torch's loader")

    monkeypatch.setattr(aot, "load", never)
    path, data = tmp_path / "step.bin", saved.data
    positions = sorted({*range(lines(data, 2)), *range(lines(data, 2), len(data), 797),
                        len(data) - 1})
    unnamed = []
    for at in positions:
        path.write_bytes(flip(data, at, at % 8))
        try:
            precompile._read(path, saved.key, fx.make_train_step(loss_fn))
            unnamed.append(at)
        except stored.Unusable as e:
            if not str(e).startswith(f"fx.precompiled: {path} "):
                unnamed.append(at)
    assert unnamed == [] and len(positions) > 1000


@SAVES
def test_a_folder_that_refuses_the_file_is_named_and_the_step_trains_on(saved, tmp_path,
                                                                        monkeypatch):
    """A read-only folder: the step compiled ahead of time trains on (not compiled again by
    torch.compile), a warning names the file and the cause, nothing is left in the folder. As
    root, who writes anyway, the folder refuses the new file as the OS refuses it to others."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "step.bin"
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def refused(*args, **kwargs):
            if kwargs.get("dir") is not None and Path(kwargs["dir"]) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    state, batch = setup()
    step = fx.precompiled(fx.make_train_step(loss_fn), path, options=QUICK)
    folder.chmod(0o555)
    try:
        with pytest.warns(UserWarning) as caught:
            trained = steps(step, state, batch)[0]
    finally:
        folder.chmod(0o755)
    assert precompiled_warnings(caught) == [
        f"fx.precompiled: the compiled step could not be saved to {path} (PermissionError: "
        f"Permission denied); it trains on, and the next process compiles it again"]
    assert step.loaded is False and step._made is not None and step._fallback is None
    assert fx.tree_digest(trained) == saved.digest
    assert list(folder.iterdir()) == []
