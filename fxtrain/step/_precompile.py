"""A train step compiled ahead of time and kept in a file, so the next process starts at once.

``torch.compile`` keeps Inductor's kernels in its cache across processes, but every process
still traces the step with Dynamo and looks its graph up again (seconds for a transformer's
step). ``precompiled(train_step, path)`` compiles the step on its first call with torch's AOT
precompile (``torch.compile(...).aot_compile``) for the inputs of that call, saves what it made
to ``path``, and in a later process loads it from there instead: no tracing, no lookup.

Torch's precompile is experimental; ``fxtrain._torch.aot`` holds what fxtrain does to use it
(the guards a saved step keeps, how it is loaded) and the torch releases it was checked on.
Where it serves no step (torch before 2.13), the file keeps torch's portable compile caches
instead (``torch.compiler.save_cache_artifacts``: ``fxtrain._torch.caches``), saved after the
step's first call: a later process loads them into its caches, and ``torch.compile`` of the step
then traces it again but compiles nothing (its first step a second or two longer than a loaded
precompiled step's). ``loaded`` says the same either way.

On the CPU the file also carries the C++ libraries Inductor built for the step (its kernels, its
``cpp_wrapper`` module, the probes of the CPU's vector instructions: ``fxtrain._torch.binaries``),
which neither torch's precompiled step nor its caches hold: a process with an empty Inductor cache
finds them there instead of building them again with the C++ compiler (most of such a warm
start: on torch 2.13 an MLP's warm first step took 2.2 CPU-seconds against 11.2 without them,
its cold one 17; benchmarks/RESULTS.md). Each is
taken only where this process's Inductor would build the same file (same source, compiler and
flags), built on a machine of the same stamp (the CPU's instruction flags, which Inductor's
``-march=native`` builds for; the compiler's file; the C library), and never over a file already
in the cache. On torch 2.11 and 2.12 Inductor also loads
each probe of the vector instructions in a fresh Python that imports torch (six on an AVX-512
machine, most of what was left of a warm start there); the step's process makes that choice with
torch 2.13's probe instead, which loads the library without importing torch
(``fxtrain._torch.vec_isa``: the same probes and the same choice).

Because the loaded step does not trace your code again, it cannot see that the code changed.
The file records what it was made from: torch's, fxtrain's and Python's versions, the structure,
shapes and dtypes of the state and the batch, and a digest of the bytecode of the step's
functions (your ``loss_fn`` and what it closes over) and of the model's ``forward`` methods. A
file that does not match is compiled again and replaced. Code outside those (a helper your
``forward`` calls from another module) is not covered: delete the file when you change it.

The file is verified whole before any of it is used: its header line holds the format's number,
a SHA-256 checksum and the length of the rest, and it is written beside the file, flushed to disk
and renamed over it. A file that gives no step (damaged: truncated, a flipped bit; of another
format; unreadable; a folder; not fxtrain's) is named in a warning with the cause, and the step is
compiled again. The new file is saved over it only where fxtrain can tell the file is its own
(damaged, empty, of another format), never over one it cannot read as its own. A folder that
refuses the file is named in a warning too: the step compiled trains on, and the next process
compiles it again.

A call whose inputs the loaded step does not accept (a short last batch, another dtype) goes to
``torch.compile(train_step, fullgraph=True)`` instead, which compiles for it as usual.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import _precompiled_file as stored
from .. import donation
from .._torch import aot, binaries, caches, vec_isa
from ._compile import bfloat16_options
from ._unguarded import Unguarded, _signature
from ._spec import StepSpec, step_spec
from ..tree import first_leaf

def _code_digest(code: types.CodeType, into: Any) -> None:
    into.update(code.co_code)
    into.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, into)
        else:
            into.update(repr(const).encode())


_PLAIN = (bool, int, float, str, bytes, type(None))


def _functions(value: Any, seen: set[int], depth: int = 0):
    """The functions ``value`` holds (itself, its closure cells and defaults, a callable's
    ``__call__`` and attributes, a tuple's items, a dataclass's fields: the step's checked
    arguments), depth first, and the plain values (numbers, strings) among them: an
    optimizer's hyperparameters, the step's settings."""
    if isinstance(value, _PLAIN):
        yield value
        return
    if id(value) in seen or depth > 64:
        return
    seen.add(id(value))
    fn = getattr(value, "__func__", value)
    if isinstance(value, (list, tuple)):  # GradientTransformation is a NamedTuple
        children = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(fn, types.FunctionType):
        yield fn
        children = [cell.cell_contents for cell in fn.__closure__ or () if _has_contents(cell)]
        children += list(fn.__defaults__ or ())
    elif callable(fn) and not isinstance(fn, (type, types.BuiltinFunctionType)):
        children = [type(fn).__call__, *(v for v in getattr(fn, "__dict__", {}).values()
                                         if callable(v))]
    else:
        return
    for child in children:
        yield from _functions(child, seen, depth + 1)


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def fingerprint(train_step: Callable, state: Any, batch: Any, kwargs: dict,
                options: dict | None = None, route: str = "aot") -> str:
    """What a saved step must have been made from to be used for these inputs (see the
    module): versions, the inputs' structure, shapes and dtypes, a digest of the code, the
    Inductor ``options`` it was compiled with, and what the file holds (``route``: ``"aot"``,
    torch's precompiled step, or ``"caches"``, its compile caches)."""
    from .._version import __version__

    digest = hashlib.sha256()
    for fn in _functions((train_step, getattr(state, "tx", None)), set()):
        if isinstance(fn, types.FunctionType):
            _code_digest(fn.__code__, digest)
        else:
            digest.update(repr(fn).encode())
    module = getattr(state, "module", None)
    if isinstance(module, torch.nn.Module):
        for kind in sorted({type(m) for m in module.modules()}, key=lambda t: t.__qualname__):
            forward = getattr(kind, "forward", None)
            digest.update(kind.__qualname__.encode())
            if isinstance(forward, types.FunctionType):
                _code_digest(forward.__code__, digest)
        for name, m in module.named_modules():  # settings read by forward: Dropout's p, ...
            plain = sorted((k, v) for k, v in vars(m).items()
                           if isinstance(v, _PLAIN) and k != "training")
            config = getattr(m, "config", None)  # a transformers model's config
            settings = config.to_json_string() if hasattr(config, "to_json_string") else ""
            digest.update(repr((name, plain, settings)).encode())
    inputs = repr((_signature(state), _signature(batch), sorted(kwargs.items()),
                   sorted((options or {}).items())))
    digest.update(re.sub(r"0x[0-9a-f]+", "0x", inputs).encode())  # no addresses
    routed = {} if route == "aot" else {"route": route}  # the AOT key as before
    return json.dumps({"torch": torch.__version__, "fxtrain": __version__,
                       "python": sys.version.split()[0], "digest": digest.hexdigest(), **routed})


def _closure(train_step: Callable) -> dict[str, Any]:
    """What the step's closure holds (its inner functions, your ``loss_fn``), by variable name:
    saved as references, not pickled, and given back from the loading process's step."""
    fn = getattr(train_step, "__func__", train_step)
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    return {f"fxtrain_closure_{name}": cell.cell_contents
            for name, cell in zip(code.co_freevars, fn.__closure__ or ()) if _has_contents(cell)}


def _read(path: Path, key: str, train_step: Callable) -> Any:
    """The step saved at ``path`` when it was made for ``key``, else None (none there, or made
    for another key); raises ``Unusable`` for a file that cannot give one (damaged, not
    fxtrain's, unreadable, a folder, refused by torch's loader). A file of the ``"caches"``
    route gives True: its caches loaded into this process's."""
    found = stored.read(path)
    if found is None or found.key != key.encode():
        return None
    body = found.body
    # built for another CPU, compiler or C library: left out, Inductor builds its own
    libraries = found.libraries if found.machine == binaries.machine() else {}
    try:
        binaries.put(libraries)  # before torch looks for them
        if json.loads(key).get("route") == "caches":
            caches.load(body)
            return True
        return aot.load(body, getattr(train_step, "__globals__", None),  # the step's module
                        _closure(train_step))
    except Exception as e:  # a whole file torch cannot load here
        raise stored.Unusable(path, f"cannot be loaded by torch ({type(e).__name__}: {e})",
                              replace=True) from e


def _packed(key: str, body: bytes, since: tuple) -> bytes:
    """The file of a step made for ``key`` with the libraries built since ``since``
    (``binaries.mark()``'s), stamped with this machine's ``binaries.machine()``."""
    return stored.pack(key, body, binaries.made_since(since), binaries.machine())


class Precompiled:
    """``step(state, batch) -> (state, metrics)``: on its first call, the step saved at its path
    for these inputs (loaded), else the step compiled ahead of time for them and saved there;
    afterwards that step wherever it accepts the inputs, else ``torch.compile``'s (see the
    module). ``loaded``: whether the step came from the file (None before the first call);
    ``spec``: the step's (compiled, its donation fixed)."""

    def __init__(self, train_step: Callable, path: Path, kwargs: dict, spec: StepSpec,
                 options: dict | None = None):
        self.train_step, self.path, self.kwargs, self.spec = train_step, path, kwargs, spec
        self.options = options  # Inductor's, over compile_options' defaults for the state
        self.loaded: bool | None = None
        self._made: Any = None  # torch's AOTCompiledFunction, once made or loaded
        self._fallback: Callable | None = None
        self._accepted: tuple | None = None  # the signature of a batch the made step took
        self._caches_key: tuple | None = None  # the caches route: the key and binaries.mark()
        # from before the first call (saved after it, with the libraries built since)
        self._skipping: Unguarded | None = None  # the caches route's call past Dynamo's guards

    def __call__(self, state: Any, batch: Any) -> tuple:
        donation.check_live(state, "train_step")  # plainly, not wrapped by the compiler
        if self.loaded is None:
            self._made, self.loaded = self._load_or_make(state, batch)
        if self._made is not None and self._made.guard_check(state, batch, **self.kwargs):
            if self._accepted is None:
                self._accepted = _signature(batch)
            return self._made(state, batch, **self.kwargs)
        if self._fallback is None:
            if self._made is not None:
                warnings.warn("fx.precompiled: the step was called with inputs it was not made "
                              "for (another structure, shape or dtype, a short last batch); "
                              "torch.compile compiles the step for them, as it would without "
                              "the saved step", stacklevel=2)
            self._fallback = torch.compile(self.train_step, fullgraph=True)
        out = self._fallback(state, batch, **self.kwargs)
        if self._caches_key is not None:  # compiled now: its caches into the file
            (key, since), self._caches_key = self._caches_key, None
            body = caches.save()
            if body is not None:
                self._save(_packed(key, body, since))
        return out

    def unguarded(self, state: Any, batch: Any) -> tuple:
        """The call without the made step's guard check (tens of microseconds), for a batch like
        one it took before and a state of the structure it returned: what ``fit`` knows of the
        next call once the first is done (see ``fxtrain.step._unguarded``); others take ``__call__``."""
        if self._made is None and self._fallback is not None:  # torch.compile's step
            donation.check_live(state, "train_step")
            if self._skipping is None:
                self._skipping = Unguarded(self._fallback)
            return self._skipping(state, batch, **self.kwargs)
        if self._accepted is None or _signature(batch) != self._accepted:
            return self(state, batch)
        donation.check_live(state, "train_step")
        return self._made(state, batch, **self.kwargs)

    def _load_or_make(self, state: Any, batch: Any) -> tuple[Any, bool]:
        options = {**compile_options(state), **(self.options or {})}
        options = bfloat16_options(self.train_step, state, options)  # fxtrain.step._compile
        if not aot.AVAILABLE:
            loaded = self._load_caches(state, batch, options)
            if _on_cpu(state):  # the file's probes in the cache, Inductor's choice made now
                vec_isa.pick()  # with torch 2.13's probe (fxtrain._torch.vec_isa)
            return None, loaded
        key = fingerprint(self.train_step, state, batch, self.kwargs, options)
        made, replace = self._read_or_warn(key, stacklevel=3)  # the step's caller
        loaded = made is not None
        if not loaded:
            since = binaries.mark()
            made, body = self._make(state, batch, options)
            if made is None:
                return None, False
            if replace:
                self._save(_packed(key, body, since))
        made.disable_guard_check()  # __call__ checks, so that a refusal can fall back
        return made, loaded

    def _read_or_warn(self, key: str, stacklevel: int) -> tuple[Any, bool]:
        """(what the file holds for ``key`` or None, whether a save may replace the file): a
        file it cannot use is a warning naming why (``stored.Unusable``), never an error."""
        try:
            return _read(self.path, key, self.train_step), True
        except stored.Unusable as e:
            warnings.warn(str(e), stacklevel=stacklevel + 1)
            return None, e.replace

    def _load_caches(self, state: Any, batch: Any, options: dict) -> bool:
        """The caches route (torch before 2.13): the file's compile caches loaded where it
        holds them for these inputs (True), else the step's saved after its first call; either
        way ``torch.compile`` with ``options`` makes the step."""
        key = fingerprint(self.train_step, state, batch, self.kwargs, options, route="caches")
        self._fallback = torch.compile(self.train_step, fullgraph=True, options=options)
        loaded, replace = self._read_or_warn(key, stacklevel=4)
        if loaded is None and replace:
            self._caches_key = key, binaries.mark()
        return loaded is not None

    def _make(self, state: Any, batch: Any, options: dict) -> tuple[Any, bytes | None]:
        """The step compiled ahead of time for these inputs and its saved bytes, or (None, None)
        where torch cannot save it (warned: the step trains under torch.compile)."""
        try:
            made = aot.compile_ahead(self.train_step, (state, batch), self.kwargs, options)
            return made, aot.serialize(made, _closure(self.train_step))
        except (*aot.errors(), TypeError) as e:
            if isinstance(e, TypeError) and "torch.compile() package" not in str(e):
                raise  # not torch refusing to save (a class defined inside a function)
            warnings.warn(f"fx.precompiled: torch cannot save this step ({e}); it runs "
                          "compiled by torch.compile, and the next process compiles it "
                          "again", stacklevel=4)
            return None, None

    def _save(self, data: bytes) -> None:
        """``data`` into the step's file; a folder that refuses it is warned of, the step
        trains on."""
        try:
            stored.write(self.path, data)
        except OSError as e:
            warnings.warn(f"fx.precompiled: the compiled step could not be saved to {self.path} "
                          f"({type(e).__name__}: {e.strerror or e}); it trains on, and the next "
                          "process compiles it again", stacklevel=4)


def compile_options(state: Any) -> dict[str, Any]:
    """The Inductor options ``precompiled`` compiles with by default for ``state``: on the CPU,
    ``cpp_wrapper`` (the kernels called from C++, not from Python: 10-20% off a small step's
    time, for seconds more of compiling, paid once since the file keeps it)."""
    return {"cpp_wrapper": True} if _on_cpu(state) else {}


def _on_cpu(state: Any) -> bool:
    params = getattr(state, "params", None)
    return bool(params) and first_leaf(params).device.type == "cpu"


def precompiled(train_step: Callable, path: str | os.PathLike, *, donate: bool = False,
                options: dict[str, Any] | None = None) -> Precompiled:
    """``train_step``, compiled on its first call and kept in the file ``path``: a later
    process whose step is the same code, for inputs of the same structure, shapes and dtypes,
    loads it from there instead of tracing and compiling it again (see the module).

    Args:
      train_step: what ``make_train_step`` returned (not yet compiled).
      path: the file (its folder must exist). A file made for other code or inputs is
        replaced; one that gives no step (damaged, unreadable, not fxtrain's) is named in a
        warning, and the step is compiled again (see the module).
      donate: for a step built with ``donate=None``: whether the step donates its state (the
        saved step is made for one choice; ``fx.fit`` reads it from the step's spec).
      options: Inductor options (``torch.compile(options=...)``), over the defaults for the
        state's device (``compile_options``: ``cpp_wrapper`` on the CPU); a file made with
        other options is made again.

    Returns a ``Precompiled`` step: ``step(state, batch) -> (state, metrics)``, as the
    compiled step returns; give it to ``fx.fit`` or call it in your loop. On torch before 2.13
    (no usable precompile: ``fxtrain._torch.aot``) the file keeps torch's compile caches
    instead, and a later process traces the step again but compiles nothing (see the module).

    Examples:
        >>> import os, tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = os.path.join(folder.name, "step.bin")
        >>> def loss_fn(state, params, batch):
        ...     return state.apply(params, batch).square().mean()
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> step = fx.precompiled(fx.make_train_step(loss_fn), path)
        >>> new, metrics = step(state, torch.ones(4, 2))
        >>> step.loaded  # compiled by this first call, and saved
        False
        >>> again = fx.precompiled(fx.make_train_step(loss_fn), path)  # as a new process would
        >>> new, metrics = again(state, torch.ones(4, 2))
        >>> again.loaded
        True
        >>> folder.cleanup()
    """
    spec = step_spec(train_step)
    if spec.compiled:
        raise TypeError("precompiled: pass the step make_train_step returned, not a compiled "
                        "one (precompiled compiles it)")
    if donate and not spec.takes_donate:
        raise ValueError("precompiled(donate=True) needs a step built with donate=None (the "
                         "default); this one was built with donate=" + repr(spec.donate))
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"precompiled: the folder {path.parent} does not exist; "
                                "create it first")
    kwargs = {"donate": bool(donate)} if spec.takes_donate else {}
    spec = spec.replace(compiled=True, donate=bool(donate) if spec.takes_donate else spec.donate)
    if options is not None and not (isinstance(options, dict) and all(
            isinstance(k, str) for k in options)):
        raise TypeError(f"precompiled: options must be a dict of Inductor option names to "
                        f"values, got {options!r}")
    return Precompiled(train_step, path, kwargs, spec, dict(options or {}))
