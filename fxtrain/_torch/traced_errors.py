"""fxtrain's own errors out of a compiled step, as themselves.

An exception raised while ``torch.compile`` traces a step reaches the caller wrapped: Dynamo's
``Unsupported: Observed exception`` or ``RuntimeError when making fake tensor call``, with the
message that names the problem deep in its chain or only in its "developer debug context".
``fail`` raises fxtrain's errors from a function Dynamo runs for real while tracing (so the error
object itself travels up as the wrapper's cause), and ``unwrapped`` finds it again, or the
model's own error (a wrong feature count), for ``fit`` to raise with its message first.
"""

from __future__ import annotations

import ast
import builtins
import copy
import re
import sys
from collections.abc import Callable
from typing import NoReturn

_KINDS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def run_while_tracing(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing Dynamo when it is not
    loaded yet (importing it takes 1.4 s, which an eager run never needs): Dynamo's decorator
    only marks the function, and the mark is the same (tests/unit/test_traced_errors.py checks that
    it still is). Dynamo then runs ``fn`` for real while tracing and uses its result as a
    constant."""
    if "torch._dynamo" in sys.modules:
        import torch

        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@run_while_tracing
def _raise(kind: str, message: str) -> bool:  # run for real while Dynamo traces, and eagerly
    error = _KINDS[kind](message)
    error.fxtrain = True
    raise error


def raisable(kind: type[Exception]) -> type[Exception]:
    """Lets ``fail`` raise ``kind`` too (a class decorator for fxtrain's own errors)."""
    _KINDS[kind.__name__] = kind
    return kind


def fail(kind: type[Exception], message: str) -> NoReturn:
    """Raises ``kind(message)`` (TypeError, ValueError, RuntimeError or a ``raisable`` kind),
    eagerly or while
    a compiled step is traced, so that the error object reaches ``fit`` as itself."""
    _raise(kind.__name__, message)
    raise AssertionError("unreachable")  # (Dynamo treats _raise's result as a constant)


def _compiler_error(error: BaseException) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def unwrapped(error: BaseException) -> BaseException | None:
    """The error a compiler exception wraps (raised by fxtrain or by the model while tracing),
    or None when ``error`` is not such a wrapper or wraps nothing of the user's."""
    if not _compiler_error(error):
        return None
    seen, inner = {id(error)}, error.__cause__ or error.__context__
    while inner is not None and id(inner) not in seen:
        if not _compiler_error(inner):
            return inner
        seen.add(id(inner))
        if type(inner).__name__.startswith("Observed"):
            return _observed(str(inner))
        inner = inner.__cause__ or inner.__context__
    return None


_OBSERVED = (re.compile(r"got (\w+)\((['\"])(.*)\2\)[\"']\)$", re.DOTALL),  # a fake-tensor call's
             re.compile(r"^raised exception (\w+)\((['\"])(.*)\2\)$", re.DOTALL))


def _observed(message: str) -> BaseException | None:
    """The model's error out of the text of Dynamo's ``Observed...`` exception (torch 2.14 and
    later: Dynamo models an exception raised while it traces as a Python exception of the
    traced code, and keeps of it only its text, ``raised exception RuntimeError("...: got
    RuntimeError('a and b must have same reduction dim...')")``), rebuilt as the builtin
    exception it names; None when the text does not say."""
    match = _OBSERVED[0].search(message) or _OBSERVED[1].search(message)
    if match is None:
        return None
    kind = getattr(builtins, match.group(1), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        return None
    try:
        text = ast.literal_eval(match.group(2) + match.group(3) + match.group(2))
    except (SyntaxError, ValueError):
        text = match.group(3)
    return kind(text)


_USER_CODE = "\n\nfrom user code:"  # where Dynamo's report of the traced stack starts


def reraise(error: BaseException, where: str) -> NoReturn:
    """Raises the error ``error`` wraps with its own message first (fxtrain's own without the
    compiler's report, the model's with it as the cause), or ``error`` itself."""
    inner = unwrapped(error)
    if inner is None:
        raise error
    again = copy.copy(inner)
    again.__traceback__ = None
    if getattr(inner, "fxtrain", False):
        if len(again.args) == 1 and isinstance(again.args[0], str):  # Dynamo appends the
            again.args = (again.args[0].split(_USER_CODE, 1)[0],)  # traced stack to it
        raise again from None
    again.add_note(f"fxtrain: raised while torch.compile traced {where} (the compiler's report "
                   "is above)")
    raise again from error
