"""What fxtrain reads of Dynamo: whether a function is ``torch.compile``'s, its counters of graph
breaks and graphs, and its explanation of one call.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. None of it imports Dynamo before it is needed
(importing it takes 1.4 s, which importing fxtrain and an eager run never pay).

- ``is_compiled``: ``torch.compile`` marks the function it returns with what it wraps
  (``_torchdynamo_orig_callable``, private); no public predicate says it (``torch.compiler``'s
  ``is_compiling`` is about the code running now, not a function).
- ``compile_counts``: ``torch._dynamo.utils.counters`` (private; what ``torch._logging``'s
  summaries read too). No public route counts graph breaks and graphs per process.
- ``explain``: ``torch._dynamo.explain`` (private; no public counterpart). It resets Dynamo's
  caches before and after its run (``torch.compiler.reset``), so compiled functions compile
  again on their next call.
- ``TRANSFORMERS_LOGGER_METHODS``: what a step's trace adds to Dynamo's
  ``ignore_logger_methods`` (``fxtrain._torch.traced_settings``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple


def is_compiled(fn: Callable) -> bool:
    """Whether ``fn`` is what ``torch.compile`` returned (it marks it with what it wraps)."""
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def marked_compiled(fn: Callable, wrapped: Callable) -> Callable:
    """``fn`` (a function that calls ``torch.compile(wrapped)``) marked as ``torch.compile``
    marks what it returns, so that ``is_compiled(fn)``."""
    fn._torchdynamo_orig_callable = wrapped  # noqa: SLF001
    return fn


TRANSFORMERS_LOGGER_METHODS = ("warning_once", "info_once", "warning_advice")
"""The methods transformers adds to ``logging.Logger`` (once-only advice: a model's
``loss_function`` calls ``warning_once`` when its ``loss_type`` is unset, as GPT-2's is)."""


def compile_counts() -> tuple[collections.Counter, int]:
    """Dynamo's counts so far in this process: its graph breaks by reason, and the graphs it
    has compiled (loads Dynamo)."""
    import torch._dynamo  # here, not at import: it takes 1.4 s

    counters = torch._dynamo.utils.counters
    return collections.Counter(counters["graph_break"]), counters["stats"]["unique_graphs"]


class Break(NamedTuple):
    """A graph break ``explain`` found: Dynamo's reason and the stack of frames that met it."""

    reason: str
    user_stack: list


class Explanation(NamedTuple):
    """What ``explain`` found in one call: the graphs, the breaks between them."""

    graph_count: int
    break_count: int
    breaks: tuple[Break, ...]


def explain(fn: Callable, *args: Any) -> Explanation:
    """Runs ``fn(*args)`` under ``torch._dynamo.explain`` (see the module; loads Dynamo)."""
    import torch._dynamo

    out = torch._dynamo.explain(fn)(*args)
    return Explanation(out.graph_count, out.graph_break_count,
                       tuple(Break(r.reason, r.user_stack) for r in out.break_reasons))
