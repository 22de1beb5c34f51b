"""What a kernel compiled and called at run time, inside an operator, needs of torch's
internals (``fx.losses.chunked_causal_lm``'s softmax: ``fxtrain.losses._chunked``).

Checked on torch 2.11.0 and 2.13.0. None of it imports Dynamo before it is needed.

- ``below_autograd``: ``torch._C._AutoDispatchBelowADInplaceOrView`` (private), the context an
  operator's kernel runs in: the compiled function is then reached through the same dispatch
  keys (the same guards) whether the operator was called eagerly or from a compiled graph;
  without it, it compiled twice. No public context says it.
- ``in_dispatch_mode``: ``torch._C._len_torch_dispatch_stack`` (private): a mode (a FLOP
  counter, a fake tensor mode) would see the compiled function's call, not its ops.
- ``rows_dynamic``: ``torch._dynamo.maybe_mark_dynamic`` (public in ``torch.compiler`` only
  from later releases): the last chunk is shorter, and one compile serves every length.
- ``COMPILE_ERRORS``: Dynamo's own exception base (``torch._dynamo.exc.TorchDynamoException``),
  what a failed compile raises before anything ran.
- ``assert_on_device``: ``torch._assert_async`` (private), a check of a tensor's value that
  the host does not wait for (the chunked loss's labels). The public ``torch._check`` reads the
  value on the host; the fallback, where a torch lacks it, is that read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def below_autograd() -> Iterator[None]:
    """No gradient, and dispatch below autograd's keys, as an operator's kernel runs."""
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
        yield


def in_dispatch_mode() -> bool:
    """Whether a torch dispatch mode is active."""
    return bool(torch._C._len_torch_dispatch_stack())


def rows_dynamic(*tensors: torch.Tensor) -> None:
    """Marks each tensor's first dimension dynamic for its next compile (if it can be)."""
    import torch._dynamo  # here, not at import: it takes 1.4 s
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a compile that failed before running anything raises."""
    import torch._dynamo
    return (torch._dynamo.exc.TorchDynamoException,)


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Fails unless ``condition`` (a 0-d bool tensor) holds, without the host waiting for the
    device: ``torch._assert_async`` (private; checked on torch 2.11.0 and 2.13.0). On the CPU
    it raises ``RuntimeError(message)`` at once; on CUDA it is a device-side assert (the
    message is not carried: torch reports "device-side assert triggered" at the next sync, as
    for an out-of-range index in ``F.cross_entropy``). Public fallback, where a torch lacks
    it: ``bool(condition)``, a read on the host."""
    assert_async = getattr(torch, "_assert_async", None)
    if assert_async is not None:
        assert_async(condition, message)
    elif not bool(condition):
        raise RuntimeError(message)
