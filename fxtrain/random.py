"""Counter-based randomness derived from a key tensor, so a step's randomness is a pure function.

Inside a train step, ``keyed(key)`` routes every random op a mode can see to a stateless hash of
(key, call index, element index): dropout (``F.dropout``, its 1d/2d/3d forms, ``alpha_dropout``,
``feature_alpha_dropout``, ``torch.native_dropout``, so every ``nn.Dropout*``), the attention
dropout of ``F.scaled_dot_product_attention`` (transformers' default attention; with dropout
it runs as the math of SDPA's reference, which the compiler fuses), ``F.rrelu`` and
``torch.bernoulli``. The key of a step is ``step_key(state.rng, state.step)``, so two runs with the same seed
draw the same masks, and a resumed run draws what an uninterrupted run would have drawn. The
masks are integer hashing, so eager and compiled steps draw identical bits. A dropout of a
DTensor (activations split over the ranks, as sequence parallelism splits them) draws on each
rank its block of the mask one process draws on the whole tensor (``_keyed_shards``).

Keys are derived (``fold_in``) by operators of their own (``torch.ops.fxtrain.fold_in*``), which
the compiler calls instead of inlining: a draw reads its key from a buffer, and its kernel holds a
single hash round of the element index. Inlined, the chain of hashes from the run's key to a
draw's grew the kernels' expressions exponentially, and a 2-layer GPT-2 step compiled 4-5 times
slower with dropout than without. A compiled step pays one such call for its step key and one
per 16 random calls.

Other random functions (``multinomial``, ``Tensor.normal_``, ``randint``, ``randperm``...)
raise an error that names them and the keyed way to draw instead, as does
``nn.MultiheadAttention`` with dropout in training (its dropout runs inside a function that no
mode can see into). Factory functions (``torch.rand``, ``randn``, ``randint``...) raise when the
step runs eagerly but are invisible to modes under ``torch.compile``; for noise in a loss
function draw it explicitly from the step's key, as in the example.

Examples:
    >>> state = fx.TrainState.create(nn.Linear(3, 1), fx.optim.sgd(0.1), seed=0)
    >>> key = fx.random.step_key(state.rng, state.step)
    >>> noise = fx.random.normal(fx.random.fold_in(key, 1), (2, 3))
    >>> noise.shape, bool(noise.equal(fx.random.normal(fx.random.fold_in(key, 1), (2, 3))))
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from . import _keyed_shards
from ._torch.modes import PYTHON_TENSOR_METHODS
from ._torch.ops import attention as attention_ops
from ._torch.traced_errors import fail

__all__ = ["seed_key", "fold_in", "step_key", "uniform", "normal", "categorical", "keyed"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_BLOCK = 16  # keys a `keyed` context derives per operator call


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply); int64 maths that never overflows."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 0-d int64 key for ``seed``.

    Examples:
        >>> fx.random.seed_key(0).dtype, fx.random.seed_key(0).shape
        (torch.int64, torch.Size([]))
        >>> bool(fx.random.seed_key(0) == fx.random.seed_key(1))
        False
    """
    return _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64, device=device) + _GOLDEN)


def _fold(key, data):
    return _mix32(_mix32(key + _GOLDEN) ^ (data & _MASK32))


def _run(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` for the key maths (a few dozen integer operations on a handful of
    elements): on plain CPU tensors in Python ints when all are single numbers, else in numpy
    (zero-copy), both several times faster than torch dispatches them; torch elsewhere."""
    if all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors):
        if all(t.dim() == 0 for t in tensors):  # a step's key: Python ints, 3 us
            return torch.tensor(fn(*(int(t) for t in tensors)), dtype=torch.int64)
        return torch.from_numpy(np.asarray(fn(*(t.numpy() for t in tensors))))
    return fn(*tensors)


# The key derivations are operators of their own, so that a compiled kernel reads a key from a
# buffer instead of inlining a hash chain (Inductor's expressions grew about 8^depth). They are
# defined on torch's dispatcher directly (not torch.library.custom_op, whose autograd wrapper
# tripled their cost per call: they run on the host in every step that draws random numbers).
_LIB = torch.library.Library("fxtrain", "FRAGMENT")
_LIB.define("fold_in(Tensor key, Tensor data) -> Tensor")
_LIB.define("fold_in_range(Tensor key, int start, int count) -> Tensor")
_LIB.define("fold_in_range_after(Tensor key, Tensor base, int start, int count) -> Tensor")
_LIB.define("stream_key(Tensor key, int stream) -> Tensor")
_LIB.define("position(Tensor key, int calls) -> Tensor")


def _fold_in_impl(key: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return _run(_fold, key, data)


def _fold_in_range_impl(key: torch.Tensor, start: int, count: int) -> torch.Tensor:
    # fold_in(key, start + i) for i < count, on a new last axis; constants need no tensor input
    # (each would be a compiled kernel of its own)
    if count == 1:
        return _run(lambda k: _fold(k, start), key)[..., None]
    data = torch.arange(start, start + count, dtype=torch.int64, device=key.device)
    return _run(lambda k, d: _fold(k[..., None], d), key, data)


def _fold_in_range_after_impl(key: torch.Tensor, base: torch.Tensor, start: int,
                              count: int) -> torch.Tensor:
    # fold_in(key, base + start + i) for i < count: a region's keys, counted from where the
    # stream stood when it was called (``continued``); the sum is in here, since each constant
    # added to ``base`` in the graph would be a compiled kernel of its own (about 0.5 CPU-s)
    data = torch.arange(start, start + count, dtype=torch.int64, device=key.device)
    return _run(lambda k, b, d: _fold(k[..., None], b[..., None] + d), key, base, data)


def _stream_key_impl(key: torch.Tensor, stream: int) -> torch.Tensor:
    return _run(lambda k: _mix32(k + stream * _GOLDEN), key)


def _position_impl(key: torch.Tensor, calls: int) -> torch.Tensor:
    # an operator rather than a constant tensor: Inductor would compile a kernel of its own
    # for each constant (one per layer of a regional step), where it calls an operator
    return torch.full((), calls, dtype=torch.int64, device=key.device)


for _name, _impl in (("fold_in", _fold_in_impl), ("fold_in_range", _fold_in_range_impl),
                     ("fold_in_range_after", _fold_in_range_after_impl),
                     ("stream_key", _stream_key_impl), ("position", _position_impl)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
_fold_in = torch.ops.fxtrain.fold_in.default
_fold_in_range = torch.ops.fxtrain.fold_in_range.default
_fold_in_range_after = torch.ops.fxtrain.fold_in_range_after.default
_stream_key = torch.ops.fxtrain.stream_key.default
_position = torch.ops.fxtrain.position.default


@torch.library.register_fake("fxtrain::fold_in")
def _(key, data):
    shape = torch.broadcast_shapes(key.shape, data.shape)
    return torch.empty(shape, dtype=torch.int64, device=key.device)


@torch.library.register_fake("fxtrain::fold_in_range")
def _(key, start, count):
    del start
    return key.new_empty((*key.shape, count))


@torch.library.register_fake("fxtrain::fold_in_range_after")
def _(key, base, start, count):
    del base, start
    return key.new_empty((*key.shape, count))


@torch.library.register_fake("fxtrain::position")
def _(key, calls):
    del calls
    return key.new_empty(())


@torch.library.register_fake("fxtrain::stream_key")
def _(key, stream):
    del stream
    return torch.empty_like(key)


def fold_in(key: torch.Tensor, data: torch.Tensor | int) -> torch.Tensor:
    """A new key that depends on ``key`` and ``data`` (an int or an int64 tensor).

    Examples:
        >>> key = fx.random.seed_key(0)
        >>> a, b = fx.random.fold_in(key, 1), fx.random.fold_in(key, torch.tensor(1))
        >>> bool(a == b), bool(a == fx.random.fold_in(key, 2))
        (True, False)
    """
    if isinstance(data, torch.Tensor):
        return _fold_in(key, data.to(device=key.device, dtype=torch.int64))
    return _fold_in_range(key, int(data), 1)[..., 0]


def step_key(rng: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The key for one step: a pure function of the run's key and the step counter.

    Examples:
        >>> rng = fx.random.seed_key(0)
        >>> k0 = fx.random.step_key(rng, torch.tensor(0))
        >>> k1 = fx.random.step_key(rng, torch.tensor(1))
        >>> bool(k0 == fx.random.step_key(rng, torch.tensor(0))), bool(k0 == k1)
        (True, False)
    """
    return fold_in(rng, step)


def _hash(key: torch.Tensor, shape: Sequence[int],
          index: torch.Tensor | None = None) -> torch.Tensor:
    """32 random bits per element of ``shape`` from a 32-bit ``key``, as int64: the element index
    spread by a Weyl multiplier, then a xorshift-multiply round with the key mixed in before and
    within it. One round (of two for keys) and int64 maths that never overflows keep it short in
    a compiled kernel and equal, bit for bit, to the eager result. ``index``: the elements'
    indices in ``shape`` (row-major) when only a block of it is drawn (``_keyed_shards``), of
    the block's shape; None: every element."""
    numel, block = math.prod(shape), index
    if index is None:
        index = torch.arange(numel, dtype=torch.int64, device=key.device)
    if numel > 1 << 32:  # indices repeat every 2**32 elements
        index = index & _MASK32
    # the multiplier is read off the key (key >> 40 is 0: keys are 32-bit) so that Inductor
    # keeps a tensor multiply: it folds arange * constant into an index expression, which its
    # Triton code types int32, and 0x61C88647 * index overflows that (a compile error on CUDA)
    weyl = (key >> 40) + 0x61C88647
    x = ((index * weyl) & _MASK32) ^ key
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ key ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    return x.reshape(tuple(shape)) if block is None else x


def _bits(key: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """``_hash`` for any int64 key (only its low 32 bits count) and ``stream``."""
    return _hash((_stream_key(key, stream) if stream else key) & _MASK32, shape)


def uniform(key: torch.Tensor, shape: Sequence[int], dtype=torch.float32, stream: int = 0):
    """Uniform samples in [0, 1) with 24 bits of resolution.

    Examples:
        >>> u = fx.random.uniform(fx.random.seed_key(0), (1000,))
        >>> bool(u.min() >= 0), bool(u.max() < 1), round(float(u.mean()), 1)
        (True, True, 0.5)
    """
    return ((_bits(key, shape, stream) >> 8).to(torch.float32) * (1.0 / (1 << 24))).to(dtype)


def normal(key: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Standard normal samples by Box-Muller: sqrt(-2 ln u1) cos(2 pi u2).

    Examples:
        >>> z = fx.random.normal(fx.random.seed_key(0), (10000,))
        >>> round(float(z.mean()), 1), round(float(z.std()), 1)
        (0.0, 1.0)
    """
    u1 = 1.0 - uniform(key, shape, torch.float32, stream=1)  # in (0, 1], so log is finite
    u2 = uniform(key, shape, torch.float32, stream=2)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


def categorical(key: torch.Tensor, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices drawn from ``softmax(logits)`` along ``dim`` (Gumbel-max), int64, with ``dim``
    removed: the keyed counterpart of ``torch.multinomial`` for sampling tokens.

    Examples:
        >>> logits = torch.tensor([[0.0, 10.0, 0.0], [10.0, 0.0, 0.0]])
        >>> fx.random.categorical(fx.random.seed_key(0), logits)
        tensor([1, 0])
    """
    u = uniform(key, logits.shape, torch.float32, stream=3)
    gumbel = -torch.log(-torch.log(u.clamp_min(2.0 ** -24)))  # u in (0, 1): finite
    return torch.argmax(logits.to(torch.float32) + gumbel, dim=dim)


def _arg(args, kwargs, index, name, default):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else default)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _keep(key, mask_shape, p, index: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of elements a dropout of probability ``p`` keeps (each dropped with
    probability ``p``); ``index``: of a block of it only (``_hash``)."""
    _check_p(p)
    return _hash(key, mask_shape, index) >= math.ceil(p * 2.0**32)


def _dropout(x, p, training, key, mask_shape, context=None):
    if not training or p == 0.0:
        _check_p(p)
        return x

    def dropped(x, index):
        return torch.where(_keep(key, mask_shape, p, index), x / (1.0 - p), torch.zeros_like(x))

    return _keyed_shards.on_block(x, mask_shape, dropped, context)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


def _attention(key: torch.Tensor, args: tuple, kwargs: dict,
               recomputed: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its attention dropout drawn from ``key``: the
    math of its documented reference (scores, masks, softmax, dropout, weighted values), which
    the compiler fuses. Without dropout the call goes to torch's own kernels unchanged.

    ``recomputed`` (a ``torch.func`` step's, where no region is checkpointed): one autograd
    Function (``fxtrain._keyed_attention``) that keeps no attention matrix for the backward and
    recomputes it there. Not on autograd's path: inside a checkpointed region (``fx.remat``,
    a model's own checkpointing) torch 2.13's compiled recomputation refused its backward
    ("Detected 2 disjoint backward regions that require recomputation")."""
    bound = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
    unknown = bound.keys() - set(_SDPA_ARGS)
    if unknown:
        raise TypeError(f"scaled_dot_product_attention got unexpected arguments {sorted(unknown)}")
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask, p, causal = bound.get("attn_mask"), float(bound.get("dropout_p", 0.0)), \
        bound.get("is_causal", False)
    scale, gqa = bound.get("scale"), bound.get("enable_gqa", False)
    if p == 0.0:
        return F.scaled_dot_product_attention(*args, **kwargs)
    if causal and mask is not None:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    if gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if causal:
        length, source = q.size(-2), k.size(-2)
        mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
    if recomputed and (mask is None or not mask.requires_grad):
        from ._keyed_attention import attention
        return attention(q, k, v, mask, key, p, scale, _keep)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    weights = torch.softmax(scores, dim=-1)
    return _dropout(weights, p, True, key, weights.shape) @ v


_SELU_ALPHA = -1.7580993408473766  # -scale * alpha of SELU: where alpha dropout sends a drop


def _alpha_dropout(x, p, training, key, mask_shape, context=None):
    """Dropout that keeps SELU's mean and variance: dropped values go to SELU's negative
    saturation, then an affine map restores the moments (as ``F.alpha_dropout``)."""
    if not training or p == 0.0:
        _check_p(p)
        return x
    _check_p(p)
    if p == 1.0:
        return torch.zeros_like(x)
    a = ((1.0 - p) * (1.0 + p * _SELU_ALPHA**2)) ** -0.5
    b = -a * _SELU_ALPHA * p

    def dropped(x, index):
        keep = _keep(key, mask_shape, p, index)
        return torch.where(keep, x, torch.full_like(x, _SELU_ALPHA)) * a + b

    return _keyed_shards.on_block(x, mask_shape, dropped, context)


def _rrelu(x, lower, upper, training, key):
    """Randomized leaky ReLU: negative inputs scaled by a slope drawn uniformly from
    [lower, upper] per element in training, by their mean otherwise (as ``F.rrelu``)."""
    if not training:
        return F.leaky_relu(x, (lower + upper) / 2)
    slope = lower + (upper - lower) * uniform(key, x.shape, x.dtype, stream=4)
    return torch.where(x >= 0, x, x * slope)


def _feature_mask_shape(x: torch.Tensor, batched_ndim: int) -> tuple[int, ...]:
    spatial = batched_ndim - 2
    return (*x.shape[: x.ndim - spatial], *([1] * spatial))


# (function, batched ndim of its channel mask or None for elementwise). Tuples scanned with `is`
# keep Dynamo's guards to one per entry instead of one per torch function the step calls.
_DROPOUTS = ((F.dropout, None), (F.dropout1d, 3), (F.dropout2d, 4), (F.dropout3d, 5))
_ALPHA_DROPOUTS = ((F.alpha_dropout, None), (F.feature_alpha_dropout, 0))
# Random functions a mode sees, eagerly and under torch.compile, that have no keyed version
# here, with what to use instead.
_UNSUPPORTED = (
    (torch.multinomial, "fx.random.categorical(key, logits)"),
    (torch.Tensor.multinomial, "fx.random.categorical(key, logits)"),
    (F.gumbel_softmax, "fx.random.uniform(key, shape) turned into Gumbel noise"),
    (torch.poisson, "a sampler built on fx.random.uniform"),
    (torch.Tensor.uniform_, "fx.random.uniform(key, shape)"),
    (torch.Tensor.normal_, "fx.random.normal(key, shape)"),
    (torch.Tensor.bernoulli_, "torch.bernoulli(probs), which is keyed"),
    (torch.Tensor.bernoulli, "torch.bernoulli(probs), which is keyed"),
    (torch.Tensor.random_, "fx.random.uniform(key, shape) scaled and floored"),
    (torch.Tensor.exponential_, "-log(fx.random.uniform(key, shape)) / rate"),
    (torch.Tensor.geometric_, "a sampler built on fx.random.uniform"),
    (torch.Tensor.cauchy_, "a sampler built on fx.random.uniform"),
    (torch.Tensor.log_normal_, "exp(fx.random.normal(key, shape))"),
    (torch.randint, "fx.random.uniform(key, shape) scaled and floored"),
    (torch.randperm, "torch.argsort(fx.random.uniform(key, (n,)))"),
    (torch.rand, "fx.random.uniform(key, shape)"),
    (torch.randn, "fx.random.normal(key, shape)"),
    (torch.rand_like, "fx.random.uniform(key, x.shape)"),
    (torch.randn_like, "fx.random.normal(key, x.shape)"),
    (torch.randint_like, "fx.random.uniform(key, x.shape) scaled and floored"),
    (torch.normal, "fx.random.normal(key, shape) * std + mean"),
)


def _name(func) -> str:
    """``func`` as a user writes it: torch.randint, torch.Tensor.normal_, F.gumbel_softmax."""
    name = getattr(func, "__name__", repr(func))
    for prefix, namespace in (("torch.", torch), ("torch.Tensor.", torch.Tensor),
                              ("torch.nn.functional.", F)):
        if getattr(namespace, name, None) is func:
            return prefix + name
    return getattr(func, "__qualname__", name)


def _save_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: keep the outputs of SDPA's kernels, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy
    return (CheckpointPolicy.MUST_SAVE if op in attention_ops() else
            CheckpointPolicy.PREFER_RECOMPUTE)


def _attention_saved():
    """A checkpointed region's contexts that keep SDPA's outputs (``_save_attention``)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_save_attention)


REENTRANT = (
    "fxtrain: torch.utils.checkpoint(use_reentrant=True) inside a train step: the reentrant "
    "variant recomputes its region in a backward pass of its own, which a step that takes "
    "its gradients as a value cannot host (and it gives no gradient to a region whose inputs "
    "need none). Pass use_reentrant=False (torch's recommended variant; "
    "transformers: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False})), or use fx.remat")


class keyed(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Routes dropout and ``bernoulli`` to counter-based draws from ``key``.

    Each random call inside the context gets its own key ``fold_in(key, i)`` for its call index
    ``i``, so the draws depend only on the key and the program, never on global state.

    Examples:
        >>> import torch.nn.functional as F
        >>> key = fx.random.seed_key(0)
        >>> with fx.random.keyed(key):
        ...     a = F.dropout(torch.ones(6), 0.5)
        >>> with fx.random.keyed(key):
        ...     b = F.dropout(torch.ones(6), 0.5)
        >>> torch.equal(a, b), sorted(set(a.tolist()))
        (True, [0.0, 2.0])
    """

    in_region = False  # a stream continued inside a compiled region (``continued``)

    def __init__(self, key: torch.Tensor, autodiff: str = "func",
                 context: tuple[int, int] | None = None):
        super().__init__()
        self.key = key
        self.autodiff = autodiff  # how the step around it differentiates (see fx.remat)
        self.context = context  # (size, rank): a context-parallel step's (_keyed_shards)
        self.calls = 0
        self.block: torch.Tensor | None = None  # fold_in(key, block_start + i), i < 16
        self.block_start = 0
        self._forked = None  # torch's generator, forked while an eager autograd step draws

    def __enter__(self):
        # An eager step whose backward reruns checkpointed regions (torch.utils.checkpoint,
        # transformers' gradient checkpointing) keeps its position in this stream as the seed
        # of torch's CPU generator, forked for the context: torch.utils.checkpoint saves that
        # generator where a region starts and restores it for the rerun, so the rerun draws
        # from the position the region started at, the same masks. Compiled, the rerun is
        # the graph's own recomputation of the same nodes: nothing to keep.
        if self.autodiff == "autograd" and not torch.compiler.is_compiling():
            self._forked = torch.random.fork_rng(devices=[])
            self._forked.__enter__()
            torch.default_generator.manual_seed(self.calls)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self._forked is not None:
            forked, self._forked = self._forked, None
            forked.__exit__(None, None, None)

    def position(self) -> torch.Tensor:
        """Where this stream stands (its draws so far), as a 0-d int64 tensor: what a region
        compiled once for every layer takes as an input, so that each layer continues the
        stream where it stands (``continued``)."""
        return _position(self.key, self.calls)

    def advance(self, draws: int) -> None:
        """Counts ``draws`` a region continuing this stream made (``continued``)."""
        self.calls += draws

    def region_key(self) -> torch.Tensor:
        """A key of its own for a region that draws under its own context (``fx.remat``):
        the next key of this stream, so the region's draws depend on where it is called."""
        return self._next_key()

    def _next_key(self) -> torch.Tensor:
        """``fold_in(key, calls)``, derived 16 at a time (one operator call for 16 draws); one
        at a time in an eager autograd step, whose reruns of checkpointed regions must call the
        same operators as the forward did (selective checkpointing replays them in order)."""
        if self._forked is not None:
            at = torch.default_generator.initial_seed()
            if at != self.calls:  # a rerun: torch.utils.checkpoint put back a region's start
                torch.default_generator.manual_seed(at + 1)
                return _fold_in_range(self.key, at + 1, 1)[..., 0]
            torch.default_generator.manual_seed(self.calls + 1)
            self.calls += 1
            return _fold_in_range(self.key, self.calls, 1)[..., 0]
        return self._from_block()

    def _from_block(self) -> torch.Tensor:
        """The next key, from the block of 16 it falls in (``_block``, derived when the first
        of them is drawn)."""
        self.calls += 1
        if self.block is None or self.calls >= self.block_start + _BLOCK:
            self.block_start = self.calls
            self.block = self._block(self.calls)
        return self.block[..., self.calls - self.block_start]

    def _block(self, start: int) -> torch.Tensor:
        """``fold_in(key, start + i)`` for the 16 draws from ``start`` on."""
        return _fold_in_range(self.key, start, _BLOCK)

    def _checkpointed(self, checkpoint: Callable, fn: Callable, *args: Any, **kwargs: Any):
        """``torch.utils.checkpoint.checkpoint(fn, ...)`` as Dynamo traces it: it hands the
        call to this mode, which would trace ``fn`` without itself, unkeyed. ``fn`` draws
        from this stream instead, where it would without the checkpoint, so its recomputation
        (the graph's own) draws the same; no key block crosses the region's edge. Advancing
        the counter inside the region is a side effect Dynamo allows once
        ``skip_fwd_side_effects_in_bwd_under_checkpoint`` is set (``make_train_step`` sets it
        for ``autodiff="autograd"``).

        Compiled, a region given no ``context_fn`` keeps the outputs of SDPA's fused kernels
        and recomputes the rest (``_attention_saved``, as ``fx.remat``'s default policy):
        torch tags those kernels random (they take a dropout probability, even at 0), and the
        recomputation in a graph holding forward, loss and backward refuses random ops ("does
        not support RNG ops in recompute regions": a transformers GPT-2 with
        ``gradient_checkpointing_enable()``, torch 2.13). With dropout, SDPA runs as keyed
        math and is recomputed like the rest. A ``context_fn`` of the user's is theirs."""
        def keyed_fn(*a, **k):
            self.block = None
            try:
                with self:
                    return fn(*a, **k)
            finally:
                self.block = None

        if torch.compiler.is_compiling() and kwargs.get("context_fn") is None:
            kwargs = {**kwargs, "context_fn": _attention_saved}
        return checkpoint(keyed_fn, *args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # two lookups in constant sets for the common case: Dynamo inlines this method for every
        # torch function a step calls, and scanning the random functions by identity made up 43%
        # of the bytecode it traced for a GPT-2 step (benchmarks/compile_time.py's)
        name = getattr(func, "__name__", None)
        if name in _RANDOM_NAMES or func is torch_checkpoint:
            return self._random(func, args, kwargs)
        if name in PYTHON_TENSOR_METHODS and getattr(torch.Tensor, name) is func and args and \
                isinstance(args[0], torch.Tensor):
            # as the method call it was: passed on as a function, Dynamo fails on some of these
            # (unflatten) and records others (split) as calls that AOTAutograd's cache refuses
            return getattr(args[0], name)(*args[1:], **kwargs)
        return func(*args, **kwargs)

    def _random(self, func, args, kwargs):
        """``func`` (named like a random function) keyed, refused, or called as it is."""
        for dropout, ndim in _DROPOUTS:
            if func is dropout:
                x = args[0]
                p = float(_arg(args, kwargs, 1, "p", 0.5))
                training = bool(_arg(args, kwargs, 2, "training", True))
                mask = x.shape if ndim is None else _feature_mask_shape(x, ndim)
                return _dropout(x, p, training, self._next_key(), mask, self.context)
        for dropout, ndim in _ALPHA_DROPOUTS:
            if func is dropout:
                x = args[0]
                p = float(_arg(args, kwargs, 1, "p", 0.5))
                training = bool(_arg(args, kwargs, 2, "training", False))
                mask = x.shape if ndim is None else (*x.shape[:2], *([1] * (x.ndim - 2)))
                return _alpha_dropout(x, p, training, self._next_key(), mask, self.context)
        if func is torch.native_dropout:
            x, p, train = args[0], float(_arg(args, kwargs, 1, "p", 0.5)), \
                _arg(args, kwargs, 2, "train", True)
            if train is False:
                return x.clone(), torch.ones_like(x, dtype=torch.bool)
            key, shape = self._next_key(), x.shape
            keep = _keyed_shards.on_block(x, shape, lambda x, index: _keep(key, shape, p, index),
                                          self.context)
            return torch.where(keep, x / (1.0 - p), torch.zeros_like(x)), keep
        if func is F.rrelu:
            x = args[0]
            lower = float(_arg(args, kwargs, 1, "lower", 1.0 / 8))
            upper = float(_arg(args, kwargs, 2, "upper", 1.0 / 3))
            training = bool(_arg(args, kwargs, 3, "training", False))
            return _rrelu(x, lower, upper, training, self._next_key())
        if func is F.scaled_dot_product_attention:
            return _attention(self._next_key(), args, kwargs, self.autodiff == "func")
        if func is F.multi_head_attention_forward and \
                float(_arg(args, kwargs, 10, "dropout_p", 0.0)) > 0.0 and \
                _arg(args, kwargs, 13, "training", True):
            # its dropout runs inside it, where no mode sees it: refused rather than unkeyed
            raise NotImplementedError(
                "fxtrain: nn.MultiheadAttention(dropout > 0) inside a train step would draw its "
                "attention dropout from torch's global generator. Build it with dropout=0.0 and "
                "apply nn.Dropout to its output, or write the attention with "
                "F.scaled_dot_product_attention(q, k, v, dropout_p=p), whose dropout is keyed.")
        if func is torch.bernoulli:
            if len(args) != 1 or kwargs:
                raise NotImplementedError("fxtrain: only torch.bernoulli(probs) is keyed in a step")
            probs = args[0]
            return (uniform(self._next_key(), probs.shape, probs.dtype) < probs).to(probs.dtype)
        for unsupported, instead in _UNSUPPORTED:  # a loop: Dynamo traces it faster than any()
            if func is unsupported:
                raise NotImplementedError(
                    f"fxtrain: {_name(func)} inside a train step would "
                    "read torch's global generator, which makes the step impure. Draw from a "
                    f"key derived from state.rng instead: {instead}, with key = "
                    "fx.random.fold_in(fx.random.step_key(state.rng, state.step), n).")
        if func is torch_checkpoint:
            if kwargs.get("use_reentrant"):
                fail(ValueError, REENTRANT)
            return self._checkpointed(func, *args, **kwargs)
        return func(*args, **kwargs)


# The names of the functions ``keyed`` looks at (a function of another name passes through;
# torch.utils.checkpoint is found by identity, as Dynamo names it otherwise).
_RANDOM_NAMES = frozenset(f.__name__ for f in (
    *(f for f, _ in _DROPOUTS + _ALPHA_DROPOUTS + _UNSUPPORTED), torch.native_dropout, F.rrelu,
    F.scaled_dot_product_attention, F.multi_head_attention_forward, torch.bernoulli))


class continued(keyed):  # noqa: N801 - a context manager, like keyed
    """The stream of a ``keyed`` context continued from ``position`` (a 0-d int64 tensor, its
    ``position()``), inside a region traced once and run for every layer
    (``fx.regional``): the i-th draw takes ``fold_in(key, position + i)``, the key the stream
    itself would have given it (the same masks, bit for bit), from a tensor rather than a
    number, so that every layer runs the same code; 16 keys per operator call
    (``fold_in_range_after``), as the stream itself derives them. The region's draws are
    counted in ``calls``; the stream around it then ``advance``s by them."""

    in_region = True

    def __init__(self, key: torch.Tensor, position: torch.Tensor, autodiff: str = "func"):
        super().__init__(key, autodiff)
        self.base = position

    def _next_key(self) -> torch.Tensor:
        return self._from_block()

    def _block(self, start: int) -> torch.Tensor:
        return _fold_in_range_after(self.key, self.base, start, _BLOCK)

