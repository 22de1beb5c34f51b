"""Mixed precision as a policy of the train step, named as Lightning names them.

- ``"32"``: everything in the parameters' dtype (the default).
- ``"bf16-mixed"``: the forward and backward run under ``torch.autocast`` in bfloat16; the
  parameters, gradients and optimizer state stay float32 (the master copy is the state).
- ``"16-mixed"``: the same in float16, with dynamic loss scaling (flax's ``DynamicScale``,
  torch's ``GradScaler``): the loss is multiplied by a scale before differentiating, the
  gradients are divided by it before the optimizer (so clipping sees true gradients), a step
  with a non-finite gradient is skipped (parameters and optimizer state unchanged) and halves
  the scale, and ``growth_interval`` finite steps in a row double it. The scale, the run of
  finite steps and the count of skipped steps live in the state
  (``state.callbacks["loss_scale"]``), so a checkpoint carries them and a resume continues
  exactly.
- ``"bf16-true"``: the parameters themselves are bfloat16 (make the state from
  ``model.to(torch.bfloat16)``); no autocast, no float32 copy.
- ``"fp8"`` (``"fp8-rowwise"``), or ``fx.precision.float8(recipe, filter=..., emulate=...)``:
  ``"bf16-mixed"`` with the linear layers' matrix products in float8, on torchao's
  ``torchao.float8`` (``fxtrain.precision._float8``): convert the model with the policy's
  ``convert`` before making its state; the parameters stay float32.

All of it is tensor maths inside the one compiled graph: no host syncs, no graph breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from .. import struct
from ..protocol import StepState

from . import _float8
from ._float8 import Float8

__all__ = ["PRECISIONS", "Policy", "policy", "float8", "Float8", "LossScale", "loss_scale"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed", "bf16-true", "fp8", "fp8-rowwise")
"""The precision policies a step takes, named as Lightning names them (and float8's: torchao's
recipes)."""
LOSS_SCALE = "loss_scale"  # the name of the loss scale's state in state.callbacks


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a precision name means for the step."""

    name: str
    compute_dtype: torch.dtype | None  # autocast's dtype, or None for no autocast
    scaled: bool  # dynamic loss scaling
    param_dtype: torch.dtype | None  # the dtype the parameters must have, or None for any
    float8: Float8 | None = dataclasses.field(default=None, repr=False)  # torchao's float8

    def convert(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` ready for this policy: a float8 policy's linear layers made torchao's
        ``Float8Linear`` (in place); any other policy's as it is."""
        return module if self.float8 is None else self.float8.convert(module)

    def check_module(self, module: torch.nn.Module, device: torch.device) -> None:
        """A clear error for a model this policy cannot train (float8: not converted, or on a
        device without float8 products and not emulated); raised while a compiled step is
        traced too, before its first graph (``fxtrain._torch.traced_errors``)."""
        if self.float8 is not None:
            _float8.check_module(module, device, self.name)

    def check_autodiff(self, module: torch.nn.Module, autodiff: str) -> None:
        """A clear error for a float8 model that ``autodiff`` (resolved) cannot differentiate:
        torchao's own layers on ``torch.func``'s path (checked while a step is traced too)."""
        if self.float8 is not None:
            _float8.check_autodiff(module, autodiff, self.name)

    def autocast(self, device: torch.device) -> Any:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def check(self, params: dict[str, torch.Tensor]) -> None:
        """A clear error for parameters this policy cannot train."""
        floats = {k: v.dtype for k, v in params.items() if v.is_floating_point()}
        if self.param_dtype is not None:
            wrong = {k: d for k, d in floats.items() if d != self.param_dtype}
            if wrong:
                name, dtype = next(iter(wrong.items()))
                raise ValueError(
                    f"precision={self.name!r} trains {self.param_dtype} parameters, but {name} "
                    f"is {dtype}; make the state from model.to({self.param_dtype}), or use "
                    "'bf16-mixed' to keep float32 parameters")
        elif self.compute_dtype is not None:
            low = {k: d for k, d in floats.items() if d in (torch.float16, torch.bfloat16)}
            if low:
                name, dtype = next(iter(low.items()))
                raise ValueError(
                    f"precision={self.name!r} keeps float32 master parameters, but {name} is "
                    f"{dtype}; make the state from the float32 model, or use 'bf16-true'")


def policy(name: str | Policy) -> Policy:
    """The ``Policy`` called ``name`` (one of ``PRECISIONS``; a ``Policy`` is itself).

    Examples:
        >>> fx.precision.policy("bf16-mixed")
        Policy(name='bf16-mixed', compute_dtype=torch.bfloat16, scaled=False, param_dtype=None)
        >>> fx.precision.policy("16-mixed").scaled
        True
    """
    if isinstance(name, Policy):
        return name
    if name in ("fp8", "fp8-rowwise"):
        return float8("tensorwise" if name == "fp8" else "rowwise")
    policies = {
        "32": Policy("32", None, False, None),
        "bf16-mixed": Policy("bf16-mixed", torch.bfloat16, False, None),
        "16-mixed": Policy("16-mixed", torch.float16, True, None),
        "bf16-true": Policy("bf16-true", None, False, torch.bfloat16),
    }
    if name not in policies:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))} (as "
                         f"Lightning names them), got {name!r}")
    return policies[name]


def float8(recipe: str = "tensorwise", *, filter: Any = None, emulate: bool = False,
           enable_fsdp_float8_all_gather: bool = False) -> Policy:
    """Float8 training on torchao (``fxtrain.precision._float8``): ``"bf16-mixed"`` with the
    chosen linear layers' matrix products in float8.

    Args:
      recipe: torchao's ``"tensorwise"`` (one scale per tensor; ``"fp8"``) or ``"rowwise"``
        (one per row; ``"fp8-rowwise"``).
      filter: ``(module, fqn) -> bool``, the layers to convert (torchao's ``module_filter_fn``;
        default: linear layers with both dimensions multiples of 16, not ``lm_head``/``output``).
      emulate: emulate the float8 products (a device without them: GPUs before compute
        capability 8.9, a CPU whose torch lacks the recipe's product), else such a device
        is refused.
      enable_fsdp_float8_all_gather: torchao's option, for ``fx.shard``: each unit casts its
        float8 layers' weight shards to float8 (one scale per weight, from its amax over the
        ranks) before the all-gather, which then moves a quarter of float32's bytes, and the
        layers multiply with the gathered float8 weights (``"tensorwise"`` only; eager steps
        with per-block units: ``fxtrain.distributed._float8_gather``).

    Examples:
        >>> fp8 = fx.precision.float8(emulate=True)
        >>> model = fp8.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)))
        >>> [type(m).__name__ for m in model]  # 10 outputs: not a multiple of 16
        ['Float8Linear', 'GELU', 'Linear']
        >>> fp8.name, fp8.compute_dtype
        ('fp8', torch.bfloat16)
        >>> step = fx.make_train_step(lambda state, params, batch: 0.0, precision=fp8)
    """
    if recipe not in _float8.RECIPES:
        raise ValueError(f"float8: recipe must be one of {', '.join(map(repr, _float8.RECIPES))} "
                         f"(torchao's), got {recipe!r}")
    if enable_fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError(f"float8: enable_fsdp_float8_all_gather takes the 'tensorwise' recipe "
                         f"(one scale per weight, as torchao's), got {recipe!r}")
    for flag, value in (("emulate", emulate),
                        ("enable_fsdp_float8_all_gather", enable_fsdp_float8_all_gather)):
        if not isinstance(value, bool):  # bool('no') is True
            raise TypeError(f"float8: {flag} must be True or False, got {value!r}")
    if filter is not None and not callable(filter):
        hint = (f"; to leave a layer out by name: filter=lambda module, fqn: not "
                f"fqn.endswith({filter!r})" if isinstance(filter, str) else "")
        raise TypeError(f"float8: filter must be a function (module, fqn) -> bool, as torchao's "
                        f"module_filter_fn, got {filter!r}{hint}")
    settings = Float8(recipe, _float8.default_filter if filter is None else filter,
                      emulate, enable_fsdp_float8_all_gather)
    return Policy("fp8" if recipe == "tensorwise" else f"fp8-{recipe}", torch.bfloat16, False,
                  None, float8=settings)


@struct.dataclass
class LossScale:
    """Dynamic loss scaling's state: the ``scale``, ``good_steps`` (finite steps since the
    scale last changed) and ``skipped`` (non-finite steps so far).

    Examples:
        >>> from fxtrain.precision import LossScale
        >>> zero = torch.tensor(0)
        >>> scale = LossScale(torch.tensor(1024.0), zero, zero, growth_interval=2)
        >>> scale = scale.update(torch.tensor(False))  # a non-finite step halves the scale
        >>> scale.scale, scale.skipped
        (tensor(512.), tensor(1))
        >>> scale = scale.update(torch.tensor(True)).update(torch.tensor(True))  # 2 finite: doubled
        >>> scale.scale, scale.good_steps
        (tensor(1024.), tensor(0))
    """

    scale: torch.Tensor
    good_steps: torch.Tensor
    skipped: torch.Tensor
    growth_interval: int = struct.field(static=True, default=2000)
    growth: float = struct.field(static=True, default=2.0)
    backoff: float = struct.field(static=True, default=0.5)

    def update(self, finite: torch.Tensor) -> LossScale:
        """The state after a step whose gradients were ``finite`` (a 0-d bool tensor)."""
        good = self.good_steps + 1
        grow = finite & (good >= self.growth_interval)
        scale = torch.where(finite, torch.where(grow, self.scale * self.growth, self.scale),
                            self.scale * self.backoff)
        good = torch.where(finite & ~grow, good, torch.zeros_like(good))
        return self.replace(scale=scale, good_steps=good, skipped=self.skipped + (~finite).long())


def loss_scale(init_scale: float = 2.0**16, growth_interval: int = 2000, growth: float = 2.0,
               backoff: float = 0.5) -> StepState:
    """The loss scale's settings and initial state: a ``StepState`` named ``"loss_scale"``,
    which a ``"16-mixed"`` step owns and updates (``make_train_step`` adds the default one; pass
    this one as its ``loss_scale=`` for other settings, and ``fx.fit`` creates its state; in your
    own loop pass it to ``TrainState.create(..., callbacks=[...])``). The settings live in its
    state.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1),
        ...                              callbacks=[fx.precision.loss_scale(init_scale=256.0)])
        >>> state.callbacks["loss_scale"].scale
        tensor(256.)
    """
    if not init_scale > 0 or growth_interval < 1 or not growth > 1 or not 0 < backoff < 1:
        raise ValueError("loss_scale: init_scale > 0, growth_interval >= 1, growth > 1 and "
                         f"0 < backoff < 1 are needed, got {init_scale}, {growth_interval}, "
                         f"{growth}, {backoff}")

    def init(state):
        device = state.step.device
        return LossScale(torch.tensor(float(init_scale), device=device),
                         torch.zeros((), dtype=torch.int64, device=device),
                         torch.zeros((), dtype=torch.int64, device=device),
                         growth_interval=growth_interval, growth=growth, backoff=backoff)

    return StepState(name=LOSS_SCALE, init=init)
