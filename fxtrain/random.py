"""Counter-based randomness derived from a key tensor, so a step's randomness is a pure function.

Inside a train step, ``keyed(key)`` routes dropout (``F.dropout`` and its 1d/2d/3d forms, so
``nn.Dropout*``) and ``torch.bernoulli`` to a stateless hash of (key, call index, element
index). The key of a step is ``step_key(state.rng, state.step)``, so two runs with the same seed
draw the same masks, and a resumed run draws what an uninterrupted run would have drawn. The
masks are integer hashing, so eager and compiled steps draw identical bits.

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

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["seed_key", "fold_in", "step_key", "uniform", "normal", "categorical", "keyed"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply); int64 maths that never overflows."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 0-d int64 key for ``seed``."""
    return _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64, device=device) + _GOLDEN)


def fold_in(key: torch.Tensor, data: torch.Tensor | int) -> torch.Tensor:
    """A new key that depends on ``key`` and ``data`` (an int or an int64 tensor)."""
    return _mix32(_mix32(key + _GOLDEN) ^ (torch.as_tensor(data, device=key.device) & _MASK32))


def step_key(rng: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The key for one step: a pure function of the run's key and the step counter."""
    return fold_in(rng, step)


def _bits(key: torch.Tensor, shape: Sequence[int], stream: int = 0) -> torch.Tensor:
    numel = math.prod(shape)
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    stream_key = _mix32(key + stream * _GOLDEN)
    return _mix32(_mix32(index ^ stream_key) + stream_key).reshape(tuple(shape))


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
    if not training or p == 0.0:
        return x
    keep = uniform(key, mask_shape) >= p
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


class keyed(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Routes dropout and ``bernoulli`` to counter-based draws from ``key``.

    Each random call inside the context gets its own key ``fold_in(key, i)`` for its call index
    ``i``, so the draws depend only on the key and the program, never on global state.
    """

    def __init__(self, key: torch.Tensor):
        super().__init__()
        self.key = key
        self.calls = 0

    def _next_key(self) -> torch.Tensor:
        self.calls += 1
        return fold_in(self.key, self.calls)

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
        if any(func is f for f in _UNSUPPORTED):
            raise NotImplementedError(
                f"fxtrain: {getattr(func, '__qualname__', func)} inside a train step would read "
                "torch's global generator, which makes the step impure. Draw from "
                "fxtrain.random.uniform/normal with a key derived from state.rng instead."
            )
        return func(*args, **kwargs)
