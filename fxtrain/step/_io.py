"""What a step checks of what comes in and goes out: the batches (one structure and dtype for
every call, on the state's device) and the value of a ``loss_fn`` or ``metrics_fn`` (a 0-d
float loss, an ``fx.losses.Mean``, a ``(loss, aux)`` pair or a transformers ``ModelOutput``).

The checks run while Dynamo traces (and on every eager call), so a compiled step pays nothing
for them per call; their errors reach you wrapped by Dynamo, with fxtrain's message inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._torch.traced_errors import fail, run_while_tracing
from ..losses._causal import Mean
from ..metrics._builtin import Average


class BatchGuard:
    """Remembers the first batch's structure and dtypes; later batches must match them."""

    def __init__(self, where: str):
        self.where = where
        self.first: tuple | None = None

        # Runs for real while Dynamo traces (and on every eager call), so it can remember.
        @run_while_tracing
        def check_signature(signature: tuple) -> bool:
            if self.first is None:
                self.first = signature
            elif signature != self.first:
                fail(ValueError,
                     f"{self.where}: this batch differs from the first one in structure or "
                     f"dtype.\n  first: {_describe(self.first)}\n  now:   {_describe(signature)}")
            return True

        self.check_signature = check_signature

    def __call__(self, batch: Any) -> None:
        flat, _ = pytree.tree_flatten_with_path(batch)
        self.check_signature(tuple(
            (pytree.keystr(path), str(leaf.dtype) if isinstance(leaf, torch.Tensor) else
             type(leaf).__name__, leaf.ndim if isinstance(leaf, torch.Tensor) else -1)
            for path, leaf in flat))


def check_batch_device(batch: Any, device: torch.device, where: str) -> None:
    """A clear error when a tensor of ``batch`` is on another device than the state (``fx.fit``
    moves batches there; a loop of your own must)."""
    for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device != device:
            raise ValueError(
                f"{where}: the batch's {pytree.keystr(path) or 'tensor'} is on {leaf.device}, "
                f"the state on {device}; move the batch there (for example with "
                f"batch = fx.to_device(batch, {str(device)!r}); fx.fit does it for you)")


def _describe(signature: tuple) -> str:
    return ", ".join(f"{path or 'batch'}: {dtype}" + (f"[{ndim}d]" if ndim >= 0 else "")
                     for path, dtype, ndim in signature) or "(no leaves)"


def model_output_loss(out: Any) -> Any:
    """The ``.loss`` of a model's output object (a transformers ``ModelOutput``), else ``out``."""
    if isinstance(out, (torch.Tensor, tuple)) or not hasattr(out, "loss"):
        return out
    if out.loss is None:
        fail(TypeError, f"loss_fn returned a {type(out).__name__} whose .loss is None; pass "
                        "labels=... to the model (transformers computes the loss then), or "
                        "compute a loss from its logits")
    return out.loss


def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """``(loss, aux, count)`` of what a ``loss_fn`` returned: ``count`` is an
    ``fx.losses.Mean``'s (what the loss averages over, by which the step weighs it against
    other batches and ranks), None for a plain loss (every batch counts alike)."""
    out = model_output_loss(out)
    loss, aux = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    count = None
    if isinstance(loss, Mean):
        loss, count = loss.value, loss.count
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else \
            type(loss).__name__
        fail(TypeError, f"loss_fn must return a 0-d loss tensor, an fx.losses.Mean, (loss, aux "
                        f"dict) or an object with a .loss (a transformers ModelOutput); it "
                        f"returned {what}. Reduce the loss, e.g. with .mean()")
    if not loss.is_floating_point():
        fail(TypeError, f"loss_fn returned a {loss.dtype} loss; it must be floating point")
    if aux is not None and not isinstance(aux, Mapping):
        fail(TypeError, f"loss_fn's aux must be a dict of 0-d tensors, got {type(aux).__name__}")
    return loss, dict(aux or {}), count


def eval_metrics(out: Any) -> dict[str, Any]:
    out = model_output_loss(out)  # a ModelOutput is a Mapping of logits too: its loss only
    if isinstance(out, Mapping):
        return dict(out)
    loss, aux, count = split_loss(out)
    if count is not None:  # averaged over batches (and ranks) by its count: fx.evaluate
        mean = out[0] if isinstance(out, tuple) else out
        return {"loss": Average(mean.total.detach().float(), mean.count.to(torch.int64)), **aux}
    return {"loss": loss, **aux}


def check_no_checkpointing(layout: Any) -> None:
    """Refuses a model whose own activation checkpointing is on (``layout.checkpointing``:
    transformers' ``gradient_checkpointing_enable()`` before ``TrainState.create``) on the
    ``torch.func`` path, which cannot run it (functorch's ``requires_grad_`` error eagerly,
    Dynamo's "unsafe side effect" compiled)."""
    if layout.checkpointing:
        fail(ValueError, "make_train_step: this model has activation checkpointing turned on "
                         "(transformers' gradient_checkpointing_enable(), or a module with "
                         "gradient_checkpointing=True), which torch.func's gradients cannot "
                         "run; build the step with fx.make_train_step(loss_fn, "
                         "autodiff='autograd'), or call fx.remat on the blocks instead")
