"""Torch's AOT precompile, for ``fx.precompiled``: compile a function ahead of time for given
inputs, serialize it, load it in another process.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. All of it is experimental in torch
(``torch.compile(...).aot_compile``, ``torch._dynamo.aot_compile.AOTCompiledFunction``, the guard
filter's entries, ``torch._guards.TracingContext``); no public route exists. Where torch says it
cannot save a step (``PackageError``, a pickling error), ``fx.precompiled`` warns and trains
under ``torch.compile``.

``AVAILABLE``: torch 2.13 or later. Torch 2.11's precompile is behind a Dynamo setting
(``enable_aot_compile``), its guards context cannot skip installing guards, and a saved step
will not load without the builtins of the process that made it (``Missing required external
references: ['__builtins_dict___0']``); there ``fx.precompiled`` keeps torch's portable compile
caches instead (``fxtrain._torch.caches``).
- ``compile_ahead``: ``dynamic=False``, the inputs' shapes and numbers as they are (the saved step
  is made for them). Torch 2.15's precompile otherwise let Dynamo's own restart
  (``TensorifyScalarRestartAnalysis``) out of a step whose float hyperparameter differed from one
  compiled earlier in the process, which Dynamo had then made symbolic.
- ``keep_serializable``: the guard filter. Not those on globals and on function identities
  (torch's own default) nor the pytree registry's size (``DICT_VERSION``: Dynamo reads the
  registry while tracing torch's pytree code, and the guard cannot be saved).
- ``load``: torch 2.13's loader rebuilds guards outside a trace, which it then refuses (fixed in
  pytorch/pytorch#187736); the load runs inside a throwaway tracing context, as that fix does.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch

from .version import at_least

AVAILABLE = at_least(2, 13)
"""Whether this torch's precompile serves ``fx.precompiled`` (see the module)."""


def errors() -> tuple[type[BaseException], ...]:
    """The errors by which torch says it cannot save a step."""
    import torch._dynamo.exc as exc  # Dynamo only when a step is compiled

    # torch 2.15's precompile lets Dynamo's own restart signal out of some steps (a float
    # hyperparameter it turns into a tensor): a step it cannot make, as the others
    restart = getattr(exc, "TensorifyScalarRestartAnalysis", None)
    return (exc.PackageError, pickle.PicklingError, *((restart,) if restart else ()))


def compile_ahead(fn: Callable, args: tuple, kwargs: dict, options: dict) -> Any:
    """``torch.compile(fn, fullgraph=True, options=...).aot_compile(((args), kwargs))``, with the
    guards ``keep_serializable`` keeps."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False,
                             options={**options, "guard_filter_fn": keep_serializable})
    return compiled.aot_compile((args, kwargs))


def keep_serializable(entries) -> list[bool]:
    """The guards a saved step keeps (see the module)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaved = {*CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES, "DICT_VERSION"}
    return [not (g.is_global or g.guard_type in unsaved or unsaved & set(g.derived_guard_types))
            for g in entries]


def serialize(compiled: Any, closure: dict[str, Any]) -> bytes:
    """What ``load`` takes back: ``compiled`` (``compile_ahead``'s), its closure's values left
    out (``closure``: given back to ``load`` by the loading process)."""
    return compiled.serialize(compiled, closure).serialized_data


def load(body: bytes, f_globals: dict | None, closure: dict[str, Any]) -> Any:
    """The compiled function ``serialize`` wrote (see the module)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction
    from torch._guards import TracingContext, tracing

    context = TracingContext(None)
    with tracing(context), context.guards_context.skip_guard_install():
        return AOTCompiledFunction.deserialize(body, f_globals=f_globals,
                                               external_closure_data=closure)
