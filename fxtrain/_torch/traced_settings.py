"""Dynamo's settings a step's trace needs, on while that trace runs and back as they were after.

Checked on torch 2.11.0, 2.13.0 and 2.15.0. ``torch._dynamo.config`` (private; no per-compile
route: ``torch.compile`` takes Inductor's options, not Dynamo's) is read by Dynamo as it traces,
where it meets what a setting is about, not once per compile. So a step turns on, at the start
of its trace, what its trace needs, and puts each setting back at the end of it:

- ``trace_autograd_ops``: Dynamo traces ``torch.autograd.grad`` (else it breaks the graph
  there), for a step on autograd's path;
- ``skip_fwd_side_effects_in_bwd_under_checkpoint``: a checkpointed region (``fx.remat``,
  ``torch.utils.checkpoint``) may advance the step's keyed stream, a Python side effect Dynamo
  otherwise refuses there;
- ``ignore_logger_methods`` (an alias of ``ignore_logging_functions`` on 2.13) gets
  transformers' once-only logger methods, which Dynamo then traces as no-ops: a model's
  ``loss_function`` calls ``warning_once`` (the advice is skipped in a compiled step; eager
  calls still log).

Both functions run for real while Dynamo traces (``run_while_tracing``); eagerly the step does
not call them (a step with graph breaks runs its frame eagerly around the compiled parts, and a
setting changed there would make Dynamo compile those again). A trace Dynamo starts
over (its analysis restarted) turns them on again and finds them on: ``scope()``'s holder
keeps what they were before the first, so the end of the trace puts back the user's values.
The step runs ``back`` in a ``finally`` (Dynamo runs it where the trace raises an error of
fxtrain's or the model's); a trace that Dynamo itself abandons between the two leaves them on
under a bare ``torch.compile`` (the next trace of the step puts them back), and as they were
under ``fx.compile`` (``kept``). """

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .dynamo import TRANSFORMERS_LOGGER_METHODS
from .traced_errors import run_while_tracing

_ON = ("trace_autograd_ops", "skip_fwd_side_effects_in_bwd_under_checkpoint")


def _logger_methods() -> set:
    if "transformers" not in sys.modules:
        return set()
    return {m for m in (getattr(logging.Logger, n, None) for n in TRANSFORMERS_LOGGER_METHODS)
            if m is not None}


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Inside, these settings are put back as they were when the block ends, a trace that
    failed between ``on`` and ``back`` included (``torch._dynamo.config.patch`` of their values
    now): ``fx.compile`` runs each call of its compiled step so."""
    import torch._dynamo.config as config

    with config.patch({k: getattr(config, k) for k in (*_ON, "ignore_logger_methods")}):
        yield


def scope() -> tuple[Callable[[], bool], Callable[[], bool]]:
    """``(on, back)``: functions a step calls at the start and at the end of its trace (see the
    module), sharing what the settings were before ``on``."""
    before: dict[str, Any] = {}

    @run_while_tracing
    def on() -> bool:
        config = sys.modules.get("torch._dynamo.config")
        if config is None:  # eager, Dynamo not imported: nothing to set
            return True
        if not before:
            before.update({k: getattr(config, k) for k in _ON})
            before["logger"] = _logger_methods() - set(config.ignore_logger_methods)
        for k in _ON:
            setattr(config, k, True)
        config.ignore_logger_methods = set(config.ignore_logger_methods) | before["logger"]
        return True

    @run_while_tracing
    def back() -> bool:
        config = sys.modules.get("torch._dynamo.config")
        if config is not None and before:
            for k in _ON:
                setattr(config, k, before[k])
            config.ignore_logger_methods = set(config.ignore_logger_methods) - before["logger"]
            before.clear()
        return True

    return on, back
