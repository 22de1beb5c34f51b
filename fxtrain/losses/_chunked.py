"""Next-token cross-entropy taken from the LM head's input, never holding the whole logits.

A language model's head turns ``(tokens, width)`` hidden states into ``(tokens, vocab)``
logits: at GPT-2's vocabulary (50257) 1024 tokens of float32 logits take 206 MB, and the plain
loss holds several such tensors at once (the logits, cross-entropy's saved log-softmax, the
gradients of both in the backward). ``chunked_causal_lm`` takes the head's input and weight
instead and goes over the tokens ``chunk_size`` at a time.

How: a ``torch.autograd.Function`` whose forward, for each chunk, computes the logits, the
loss and at once the loss's gradient with respect to the logits (softmax minus one-hot), and
from it the chunk's gradient with respect to the hidden states and its share of the gradient
with respect to the weight (and bias). The chunk's logits are then dropped: what the Function
keeps for its backward is those gradients (``tokens x width`` and ``vocab x width``), and the
backward only scales them by the incoming gradient. The loss is a sum of per-token terms, so
the gradients are exact (linear in the incoming gradient), and there is nothing to recompute.
This is the "fused linear cross-entropy" of Liger-Kernel, written in plain torch ops so that
it runs under ``torch.autograd``, under ``torch.func`` transforms (the Function has a
``setup_context`` and a generated vmap rule) and traced by ``torch.compile(fullgraph=True)``.
The chunk loop is one custom operator (``fxtrain::chunked_linear_cross_entropy``, with a vmap
rule) that a compiled graph calls as it is: traced into the graph, Inductor scheduled several
chunks' blocks at once and the loss took more than half the plain loss's memory (993 MB
against 1571 at 4096 tokens); as one operator, 367. Autocast's dtype for the head's products is
read where the loss is traced and passed to the operator (a compiled graph runs without
autocast's context). Inside the operator, each chunk's softmax and gradient of a real
vocabulary's block are one kernel compiled by Inductor (``_softmax_grad_``, which writes the
gradient over the logits), called at run time; eagerly they were some ten memory-bound passes.
The price: the gradients are computed in the forward even if no backward follows, so the
Function is used only when some input requires grad; otherwise only the loss is computed.
Second derivatives are not supported (the saved gradients are constants to autograd).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._labels import checked_labels
from ._mean import IGNORE_INDEX, Mean
from .._torch import kernels, vec_isa


def chunked_causal_lm(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                      shift: bool = True, bias: torch.Tensor | None = None) -> Mean:
    """``fx.losses.causal_lm(F.linear(hidden, weight, bias), labels)`` without the logits.

    The same ``Mean`` (sum of the float32 cross-entropy over the labelled tokens and their
    count), with the same gradients with respect to ``hidden``, ``weight`` and ``bias``, but
    at most ``chunk_size`` tokens' logits exist at a time, in the forward and the backward.

    Args:
      hidden: ``(batch, length, width)``, the LM head's input (the model's final hidden
        states), any float dtype; under autocast the head's products run as autocast says.
      weight: ``(vocab, width)``, the head's weight (with tied embeddings, the embedding's).
      labels: ``(batch, length)`` token ids, ``ignore_index`` where no loss is taken.
      chunk_size: tokens per chunk; each chunk holds a ``(chunk_size, vocab)`` float32 block.
      shift: True (transformers' convention): position ``t`` predicts label ``t + 1``; False:
        ``labels`` are already the targets of each position.
      bias: ``(vocab,)``, the head's bias, if it has one.

    Examples:
        >>> hidden, weight = torch.randn(1, 5, 4), torch.randn(7, 4)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100]])
        >>> loss = chunked_causal_lm(hidden, weight, labels, chunk_size=2)
        >>> plain = fx.losses.causal_lm(hidden @ weight.T, labels)
        >>> int(loss.count), bool(torch.allclose(loss.total, plain.total))
        (2, True)
    """
    _check(hidden, weight, labels, chunk_size, bias)
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = checked_labels(labels.reshape(-1), weight.shape[0], ignore_index,
                             "fx.losses.chunked_causal_lm")
    inputs = (flat, weight) if bias is None else (flat, weight, bias)
    if torch.is_grad_enabled() and any(map(_tracked, inputs)):
        total = _LinearCrossEntropy.apply(flat, weight, bias, targets, chunk_size,
                                          ignore_index)[0]
    else:
        total = _summed(flat, weight, bias, targets, chunk_size, ignore_index, False)[0]
    return Mean(total, (targets != ignore_index).sum())


def _tracked(tensor: torch.Tensor) -> bool:
    """Whether a gradient may be taken through ``tensor`` (by autograd or a ``torch.func``
    transform): then the loss goes through the Function, which computes the gradients.

    Asked of a view: Dynamo (torch 2.13), tracing ``torch.func.grad``, answers False for the
    transformed function's own inputs (rightly for anything computed from them), so a head
    weight taken straight from the step's parameters under a frozen body would take the other
    path. A False is never wrong, only costly: the other path is autograd's ordinary ops,
    differentiable with the whole logits' memory.
    """
    return tensor.view_as(tensor).requires_grad


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
           bias: torch.Tensor | None) -> None:
    """Names what is wrong with the arguments, before any product would fail obscurely."""
    name = "fx.losses.chunked_causal_lm"
    if hidden.ndim != 3:
        raise ValueError(f"{name}: hidden must be (batch, length, width); got "
                         f"{tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{name}: weight must be (vocab, width) with the hidden states' width "
                         f"{hidden.shape[2]}; got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{name}: labels must be (batch, length) = {tuple(hidden.shape[:2])} "
                         f"as the hidden states; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name}: labels must be integer token ids; got {labels.dtype}")
    for what, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and not tensor.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating point (the LM head's "
                            f"{'input' if what == 'hidden' else what}); got {tensor.dtype}: "
                            "pass the model's hidden states and its head's parameters")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be (vocab,) = ({weight.shape[0]},); got "
                         f"{tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be an int >= 1; got {chunk_size!r}")


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed loss, with the gradients taken in the forward chunk by chunk and kept for
    the backward, which scales them by the loss's incoming gradient.

    ``forward`` returns ``(total, grad_hidden, grad_weight, grad_bias)``; only ``total`` is
    differentiable (the gradients ride along as outputs because ``setup_context``, which
    ``torch.func`` requires, sees only the inputs and outputs). Every input's gradient is
    computed: which inputs a transform tracks cannot be told reliably from inside (under
    ``vmap`` a batched tensor says it requires no grad even where an outer ``grad`` tracks
    it), and a gradient left out would be a silent zero. A frozen head costs its unused
    ``vocab x width`` gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, targets, chunk_size, ignore_index):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
            torch.promote_types(hidden.dtype, weight.dtype)
        total, grad_hidden, grad_weight, grad_bias = _chunked_grads(
            hidden, weight, bias, targets, chunk_size, ignore_index, dtype)
        return total, grad_hidden, grad_weight, grad_bias if bias is not None else None

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias = inputs[:3]
        grads = output[1:]
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))
        ctx.set_materialize_grads(False)  # no zeros of the gradients' shapes for backward
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        del unused  # the gradients are not differentiable outputs
        if grad_total is None:  # the loss went unused: no gradient to anything
            return None, None, None, None, None, None
        scaled = [None if g is None else (g * grad_total).to(dtype)
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*scaled, None, None, None)


@torch.library.custom_op("fxtrain::chunked_linear_cross_entropy", mutates_args=())
def _chunked_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, chunk_size: int, ignore_index: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """``_summed`` with the gradients, as one operator: a compiled step calls it as it is
    (Inductor would otherwise schedule the chunks' blocks of every chunk at once, holding more
    than the whole logits), the head's products in ``dtype`` (autocast's, decided where the
    loss is traced: a compiled graph runs without autocast's context). No bias: an empty
    ``grad_bias``."""
    device = hidden.device.type
    with torch.autocast(device, enabled=False):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        total, grad_hidden, grad_weight, grad_bias = _summed(
            cast(hidden), cast(weight), cast(bias), targets, chunk_size, ignore_index, True)
    return (total, grad_hidden, grad_weight,
            grad_bias if grad_bias is not None else hidden.new_empty(0, dtype=torch.float32))


@_chunked_grads.register_fake
def _(hidden, weight, bias, targets, chunk_size, ignore_index, dtype):
    vocab, width = weight.shape
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape, dtype=dtype),
            weight.new_empty((vocab, width), dtype=torch.float32),
            weight.new_empty((vocab if bias is not None else 0,), dtype=torch.float32))


@torch.library.register_vmap("fxtrain::chunked_linear_cross_entropy")
def _(info, in_dims, hidden, weight, bias, targets, chunk_size, ignore_index, dtype):
    """One call per batched entry (a vmap over sequences: per-example gradients)."""
    size = info.batch_size
    take = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
    outs = [_chunked_grads(take(hidden, in_dims[0], i), take(weight, in_dims[1], i),
                           None if bias is None else take(bias, in_dims[2], i),
                           take(targets, in_dims[3], i), chunk_size, ignore_index, dtype)
            for i in range(size)]
    return tuple(torch.stack(parts) for parts in zip(*outs)), (0, 0, 0, 0)


def _summed(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, chunk_size: int, ignore_index: int,
            with_grads: bool) -> tuple:
    """``(total, grad_hidden, grad_weight, grad_bias)`` of the cross-entropy summed over the
    labelled rows of ``hidden`` (``(tokens, width)``), one chunk of rows at a time. The
    gradients are None without ``with_grads``, and ``grad_bias`` is None without a bias.

    ``grad_hidden`` is in the head's compute dtype; ``grad_weight`` and ``grad_bias`` are
    accumulated in float32 (the backward casts). Each accumulator starts as the first chunk's
    own term rather than zeros, so that under ``vmap`` it is batched like the terms added to
    it in place. No rows (a length-1 sequence, shifted) is one empty chunk: zeros.
    """
    total, grad_weight, grad_bias, grad_rows = None, None, None, []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        rows = hidden[start:start + chunk_size]
        loss, grad_logits = _chunk(rows, weight, bias, targets[start:start + chunk_size],
                                   ignore_index, with_grads)
        total = loss if total is None else total + loss
        if not with_grads:
            continue
        grad_rows.append(grad_logits @ weight)
        grad_weight = _accumulate(grad_weight, grad_logits, rows)
        if bias is not None:
            term = grad_logits.float().sum(0)
            grad_bias = term if grad_bias is None else grad_bias + term
        del grad_logits  # before the next chunk's logits: one block alive at a time
    grad_hidden = torch.cat(grad_rows) if with_grads else None
    return total, grad_hidden, grad_weight, grad_bias


def _chunk(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           targets: torch.Tensor, ignore_index: int, with_grad: bool) -> tuple:
    """One chunk's summed float32 cross-entropy and, ``with_grad``, its gradient with respect
    to the chunk's logits (in the logits' dtype, None otherwise).

    With the gradient, a block of at least ``FUSED_MIN_LOGITS`` on the CPU or CUDA goes to
    one compiled kernel that overwrites the logits with their gradient (``_fused_grad_``);
    otherwise the softmax is taken in place in the float32 logits (max, subtract, exp,
    normalise), so a chunk holds one ``(rows, vocab)`` float32 block at a time (two where the
    head runs in a lower precision: the logits as computed, then their float32 copy). That runs
    only inside the Function's forward, where nothing records it; without the gradient the ops
    are autograd's ordinary differentiable ones.
    """
    logits = F.linear(rows, weight, bias)
    if with_grad and _fusable(logits):
        loss = _fused_grad_(logits, targets, ignore_index)
        if loss is not None:
            return loss, logits  # now the gradient
    compute_dtype = logits.dtype
    logits = logits.float()
    labelled = targets != ignore_index
    safe = torch.where(labelled, targets, 0)[:, None]
    picked = logits.gather(1, safe).squeeze(1)
    if not with_grad:  # out of place: differentiable, should a transform still track it
        return torch.where(labelled, logits.logsumexp(1) - picked, 0.0).sum(), None
    peak = logits.amax(1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    norm = exp.sum(1, keepdim=True)
    log_norm = (peak + norm.log()).squeeze(1)
    loss = torch.where(labelled, log_norm - picked, 0.0).sum()
    probs = exp.div_(norm).mul_(labelled[:, None])  # softmax; no gradient for unlabelled rows
    grad_logits = probs.scatter_add_(1, safe, -labelled[:, None].to(probs.dtype))
    return loss, grad_logits.to(compute_dtype)


# -- the compiled kernel ----------------------------------------------------------------------
#
# Eagerly, the softmax and its gradient are some ten passes over a (rows, vocab) float32 block
# (a float32 copy of bfloat16 logits, max, subtract, exp, sum, divide, mask, scatter, the cast
# back), memory-bound on a GPU. Inductor fuses them into one kernel that reads the logits two
# or three times (max and sum, then the gradient) and writes the gradient over them, in their
# dtype: no float32 copy. It is compiled on the first block (seconds), the rows dynamic (the
# last chunk is shorter), once per dtype and vocabulary, and called from inside the operator at
# run time, eagerly or in a compiled step alike (the outer graph calls the operator whole).
# Below ``FUSED_MIN_LOGITS`` (a toy head, a test) the compile would not pay: eager. Eager too
# under a dispatch mode (Dynamo compiles nothing there), while a CUDA graph is captured (no
# compiling inside a capture), and, after a warning, on a device where compiling failed (no
# C++ compiler for the CPU, say). On a 2-core CPU (float32, 2048 x 50257) the kernel took as
# long as the eager ops; from bfloat16 logits, 0.43x (benchmarks/chunked_ce_kernel.py).

FUSED_MIN_LOGITS = 1 << 20
_FUSED_DEVICES = ("cpu", "cuda")
_failed: set[str] = set()  # device types where compiling the kernel failed: eager there


def _fusable(logits: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this block (see above)."""
    device = logits.device.type
    return (logits.numel() >= FUSED_MIN_LOGITS and device in _FUSED_DEVICES
            and device not in _failed and type(logits) is torch.Tensor
            and not torch.compiler.is_compiling() and not kernels.in_dispatch_mode()
            and not (device == "cuda" and torch.cuda.is_current_stream_capturing()))


def _fused_grad_(logits: torch.Tensor, targets: torch.Tensor,
                 ignore_index: int) -> torch.Tensor | None:
    """``_softmax_grad_`` compiled: the chunk's loss, its logits overwritten by their
    gradient. None, the logits untouched, where Dynamo ran it uncompiled (a stance, a
    recompile limit), or, after a warning, where compiling it failed."""
    kernels.rows_dynamic(logits, targets)
    vec_isa.pick_for(logits.device.type)  # eager here: see fxtrain._torch.vec_isa
    try:
        # below autograd, as an operator's kernel runs: the same guards however it was reached
        with kernels.below_autograd():
            return _compiled_softmax_grad()(logits, targets, ignore_index)
    except kernels.compile_errors() as error:  # raised before anything ran
        _failed.add(logits.device.type)
        warnings.warn(f"fx.losses.chunked_causal_lm: compiling its softmax kernel for "
                      f"{logits.device.type} failed ({type(error).__name__}: {error}); the "
                      f"eager ops run instead (slower)", RuntimeWarning, stacklevel=2)
        return None


@functools.cache
def _compiled_softmax_grad() -> Callable:
    return torch.compile(_softmax_grad_, fullgraph=True)


def _softmax_grad_(logits: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int) -> torch.Tensor | None:
    """The summed cross-entropy of ``logits`` (``(rows, vocab)``) against ``targets``, taken
    in float32, and the logits overwritten by its gradient, in their dtype:

        loss = sum over labelled rows of  log(sum_v exp(x_v)) - x_target
        grad = softmax(x) - onehot(target) on labelled rows, 0 on the others

    The max and sum are kept apart (``exp(x - max) / sum``, not ``exp(x - logsumexp)``) as the
    eager path does: a probability near 1 keeps float32's relative precision.

    Written for Inductor: out of place, each intermediate a full block, were it run as Python.
    So run as Python (Dynamo told to run nothing compiled) it does nothing and returns None.
    """
    if not torch.compiler.is_compiling():
        return None
    x = logits.float()
    labelled = (targets != ignore_index)[:, None]
    safe = torch.where(labelled, targets[:, None], 0)
    onehot = torch.arange(x.shape[1], device=x.device) == safe
    # not x.gather: torch 2.11's Inductor ran that read after the overwrite of the logits
    picked = torch.where(onehot, x, 0.0).sum(1, keepdim=True)
    peak = x.amax(1, keepdim=True)
    norm = (x - peak).exp().sum(1, keepdim=True)
    loss = torch.where(labelled, peak + norm.log() - picked, 0.0).sum()
    grad = torch.where(labelled, (x - peak).exp() / norm - onehot.to(x.dtype), 0.0)
    logits.copy_(grad)
    return loss


def _accumulate(grad_weight: torch.Tensor | None, grad_logits: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
    """``grad_weight + grad_logits.T @ rows`` in float32, in place where the product is
    float32 already (no second ``vocab x width`` block); the first chunk's term starts it."""
    if grad_weight is None:
        return (grad_logits.T @ rows).float()
    if grad_logits.dtype == rows.dtype == torch.float32:
        return grad_weight.addmm_(grad_logits.T, rows)
    return grad_weight.add_(grad_logits.T @ rows)
