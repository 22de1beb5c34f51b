"""Counter-based randomness derived from a key tensor, so a step's randomness is a pure function.

Inside a train step, ``keyed(key)`` routes dropout (``F.dropout`` and its 1d/2d/3d forms, so
``nn.Dropout*``) and ``torch.bernoulli`` to a stateless hash of (key, call index, element
index). The key of a step is ``step_key(state.rng, state.step)``, so two runs with the same seed
draw the same masks, and a resumed run draws what an uninterrupted run would have drawn. The
masks are integer hashing, so eager and compiled steps draw identical bits.

Keys are derived (``fold_in``) by operators of their own (``torch.ops.fxtrain.fold_in*``), which
the compiler calls instead of inlining: a draw reads its key from a buffer, and its kernel holds a
single hash round of the element index. Inlined, the chain of hashes from the run's key to a
draw's grew the kernels' expressions exponentially, and a 2-layer GPT-2 step compiled 4-5 times
slower with dropout than without. A compiled step pays one such call for its step key and one
per 16 random calls.

Other random functions that PyTorch lets a mode intercept (``multinomial``, ``Tensor.normal_``,
``rrelu``...) raise instead of silently reading torch's global generator. Factory functions
(``torch.rand``, ``randn``, ``rand_like``...) are invisible to modes under ``torch.compile``;
for noise in a loss function draw it explicitly::

    key = fx.random.step_key(state.rng, state.step)
    noise = fx.random.normal(fx.random.fold_in(key, 1), x.shape)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
    """The 0-d int64 key for ``seed``."""
    return _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64, device=device) + _GOLDEN)


def _fold(key, data):
    return _mix32(_mix32(key + _GOLDEN) ^ (data & _MASK32))


def _run(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)``, in numpy for plain CPU tensors (zero-copy): the key maths is a few dozen
    operations on a handful of elements, which numpy runs 3x faster than torch dispatches them."""
    if all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors):
        return torch.from_numpy(np.asarray(fn(*(t.numpy() for t in tensors))))
    return fn(*tensors)


@torch.library.custom_op("fxtrain::fold_in", mutates_args=())
def _fold_in(key: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return _run(_fold, key, data)


@torch.library.custom_op("fxtrain::fold_in_range", mutates_args=())
def _fold_in_range(key: torch.Tensor, start: int, count: int) -> torch.Tensor:
    # fold_in(key, start + i) for i < count, on a new last axis; constants need no tensor input
    # (each would be a compiled kernel of its own)
    data = torch.arange(start, start + count, dtype=torch.int64, device=key.device)
    return _run(lambda k, d: _fold(k[..., None], d), key, data)


@torch.library.custom_op("fxtrain::stream_key", mutates_args=())
def _stream_key(key: torch.Tensor, stream: int) -> torch.Tensor:
    return _run(lambda k: _mix32(k + stream * _GOLDEN), key)


@_fold_in.register_fake
def _(key, data):
    shape = torch.broadcast_shapes(key.shape, data.shape)
    return torch.empty(shape, dtype=torch.int64, device=key.device)


@_fold_in_range.register_fake
def _(key, start, count):
    del start
    return key.new_empty((*key.shape, count))


@_stream_key.register_fake
def _(key, stream):
    del stream
    return torch.empty_like(key)


def fold_in(key: torch.Tensor, data: torch.Tensor | int) -> torch.Tensor:
    """A new key that depends on ``key`` and ``data`` (an int or an int64 tensor)."""
    if isinstance(data, torch.Tensor):
        return _fold_in(key, data.to(device=key.device, dtype=torch.int64))
    return _fold_in_range(key, int(data), 1)[..., 0]


def step_key(rng: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The key for one step: a pure function of the run's key and the step counter."""
    return fold_in(rng, step)


def _hash(key: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """32 random bits per element of ``shape`` from a 32-bit ``key``, as int64: the element index
    spread by a Weyl multiplier, then a xorshift-multiply round with the key mixed in before and
    within it. One round (of two for keys) and int64 maths that never overflows keep it short in
    a compiled kernel and equal, bit for bit, to the eager result."""
    numel = math.prod(shape)
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
    return (x ^ (x >> 16)).reshape(tuple(shape))


def _bits(key: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    """``_hash`` for any int64 key (only its low 32 bits count) and ``stream``."""
    return _hash((_stream_key(key, stream) if stream else key) & _MASK32, shape)


def uniform(key: torch.Tensor, shape: Sequence[int], dtype=torch.float32, stream: int = 0):
    """Uniform samples in [0, 1) with 24 bits of resolution."""
    return ((_bits(key, shape, stream) >> 8).to(torch.float32) * (1.0 / (1 << 24))).to(dtype)


def normal(key: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Standard normal samples by Box-Muller: sqrt(-2 ln u1) cos(2 pi u2)."""
    u1 = 1.0 - uniform(key, shape, torch.float32, stream=1)  # in (0, 1], so log is finite
    u2 = uniform(key, shape, torch.float32, stream=2)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


def categorical(key: torch.Tensor, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices drawn from ``softmax(logits)`` along ``dim`` (Gumbel-max), int64, with ``dim``
    removed: the keyed counterpart of ``torch.multinomial`` for sampling tokens."""
    u = uniform(key, logits.shape, torch.float32, stream=3)
    gumbel = -torch.log(-torch.log(u.clamp_min(2.0 ** -24)))  # u in (0, 1): finite
    return torch.argmax(logits.to(torch.float32) + gumbel, dim=dim)


def _arg(args, kwargs, index, name, default):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else default)


def _dropout(x, p, training, key, mask_shape):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    keep = _hash(key, mask_shape) >= math.ceil(p * 2.0**32)  # drop with probability p
    return torch.where(keep, x / (1.0 - p), torch.zeros_like(x))


def _feature_mask_shape(x: torch.Tensor, batched_ndim: int) -> tuple[int, ...]:
    spatial = batched_ndim - 2
    return (*x.shape[: x.ndim - spatial], *([1] * spatial))


# (function, batched ndim of its channel mask or None for elementwise). Tuples scanned with `is`
# keep Dynamo's guards to one per entry instead of one per torch function the step calls.
_DROPOUTS = ((F.dropout, None), (F.dropout1d, 3), (F.dropout2d, 4), (F.dropout3d, 5))
# Random functions a mode sees both eagerly and under torch.compile, that we do not cover.
_UNSUPPORTED = (
    torch.multinomial, torch.poisson, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
    F.gumbel_softmax, torch.Tensor.multinomial, torch.Tensor.uniform_, torch.Tensor.normal_,
    torch.Tensor.bernoulli_, torch.Tensor.bernoulli, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_,
)


def _is_python_tensor_method(func) -> bool:
    """A method of ``torch.Tensor`` written in Python (torch/_tensor.py: split, unflatten...)."""
    return (getattr(func, "__module__", None) == "torch._tensor"
            and getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func)


class keyed(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Routes dropout and ``bernoulli`` to counter-based draws from ``key``.

    Each random call inside the context gets its own key ``fold_in(key, i)`` for its call index
    ``i``, so the draws depend only on the key and the program, never on global state.
    """

    def __init__(self, key: torch.Tensor):
        super().__init__()
        self.key = key
        self.calls = 0
        self.block: torch.Tensor | None = None

    def _next_key(self) -> torch.Tensor:
        """``fold_in(key, calls)``, derived 16 at a time (one operator call for 16 draws)."""
        self.calls += 1
        offset = (self.calls - 1) % _BLOCK
        if offset == 0:
            self.block = _fold_in_range(self.key, self.calls, _BLOCK)
        return self.block[..., offset]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for dropout, ndim in _DROPOUTS:
            if func is dropout:
                x = args[0]
                p = float(_arg(args, kwargs, 1, "p", 0.5))
                training = bool(_arg(args, kwargs, 2, "training", True))
                mask = x.shape if ndim is None else _feature_mask_shape(x, ndim)
                return _dropout(x, p, training, self._next_key(), mask)
        if func is torch.bernoulli:
            if len(args) != 1 or kwargs:
                raise NotImplementedError("fxtrain: only torch.bernoulli(probs) is keyed in a step")
            probs = args[0]
            return (uniform(self._next_key(), probs.shape, probs.dtype) < probs).to(probs.dtype)
        for unsupported in _UNSUPPORTED:  # a loop: Dynamo traces it faster than any(...)
            if func is unsupported:
                raise NotImplementedError(
                    f"fxtrain: {getattr(func, '__qualname__', func)} inside a train step would "
                    "read torch's global generator, which makes the step impure. Draw from "
                    "fxtrain.random.uniform/normal with a key derived from state.rng instead."
                )
        if _is_python_tensor_method(func) and args and isinstance(args[0], torch.Tensor):
            # as the method call it was: passed on as a function, Dynamo fails on some of these
            # (unflatten) and records others (split) as calls that AOTAutograd's cache refuses
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)
