"""Float8 training on torchao's ``torchao.float8``: the linear layers' matrix products in
float8 (e4m3 forward, e5m2 gradients, scaled dynamically per tensor or per row), the rest of the
step under bfloat16 autocast, the master parameters float32.

The model is converted before its state is made: ``convert_to_float8_training`` swaps the
chosen ``nn.Linear`` layers for ``Float8Linear``, which keeps their parameters (the same names,
dtypes and values), so the state, its checkpoints and their resume are those of the float32
model; dynamic scaling keeps no state of its own (torchao 0.18 has no delayed scaling). Which
layers, by default, is torchtitan's rule: linear layers whose both dimensions are multiples of
16 (float8's matrix products need them), except the language-model head (by name: ``lm_head``,
``output``), whose logits want the precision.

torchao's ``Float8Linear`` differentiates through an ``autograd.Function`` without
``setup_context``, which ``torch.func`` transforms refuse; ``convert`` makes the layers
``fxtrain._torch.float8.Float8Linear`` instead, torchao's layer multiplying through the same
computation written as ``torch.func`` wants it, so a float8 step takes its gradients either way
(``autodiff="func"``, what ``"auto"`` picks for a plain layout, or ``"autograd"``), with the same
bits. A model converted by torchao's own ``convert_to_float8_training`` trains on autograd's
path only (``check_autodiff``).

Float8 matrix products (``torch._scaled_mm``) run on a CUDA GPU of compute capability 8.9 or more
(Ada, Hopper and later), where they are fast, and on the CPU (oneDNN: one scale per tensor on
torch 2.11 to 2.15, per row too from 2.13; ``cpu_runs_float8`` tries it), where they give the
same rounding but no speed over bfloat16. Elsewhere the policy is refused unless
``emulate=True``: torchao then casts to float8 and back and multiplies in the high precision,
the same rounding without the float8 product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._torch.scaled_mm import cpu_runs_float8
from .._torch.traced_errors import fail

HEADS = ("lm_head", "output")  # the language-model heads left in bfloat16, by their last name
RECIPES = ("tensorwise", "rowwise")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """torchtitan's rule: a linear layer with both dimensions multiples of 16, not a head.

    Examples:
        >>> from fxtrain.precision._float8 import default_filter
        >>> default_filter(nn.Linear(32, 64), "block.up"), default_filter(nn.Linear(32, 10), "fc")
        (True, False)
        >>> default_filter(nn.Linear(64, 256), "lm_head")
        False
    """
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0 and fqn.rsplit(".", 1)[-1] not in HEADS)


def device_runs_float8(device: torch.device, rowwise: bool = False) -> bool:
    """Whether ``device`` multiplies in float8: CUDA of compute capability 8.9 or more, or a
    CPU whose torch runs ``torch._scaled_mm`` with the recipe's scales (``cpu_runs_float8``)."""
    if device.type == "cpu":
        return cpu_runs_float8(rowwise)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _rowwise(layers: list[nn.Module]) -> bool:
    return any(m.config.cast_config_weight.scaling_granularity.name == "AXISWISE"
               for m in layers)


def torchao_float8() -> Any:
    """``torchao.float8``, or an ImportError that says how to install it."""
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise ImportError("precision='fp8' trains on torchao's float8: pip install "
                          "'fxtrain[fp8]' (torchao)") from e
    return float8


@dataclasses.dataclass(frozen=True)
class Float8:
    """How a model trains in float8: torchao's ``recipe``, which linear layers (``filter``:
    ``(module, fqn) -> bool``, torchao's ``module_filter_fn``), and whether to ``emulate`` the
    float8 matrix products (on a device without them)."""

    recipe: str = "tensorwise"
    filter: Callable[[nn.Module, str], bool] = default_filter
    emulate: bool = False
    enable_fsdp_float8_all_gather: bool = False  # torchao's name: fx.shard's units gather
    # these layers' weights in float8 (fxtrain.distributed._float8_gather)

    def config(self) -> Any:
        """torchao's ``Float8LinearConfig`` of the recipe, emulated or not."""
        config = torchao_float8().Float8LinearConfig.from_recipe_name(self.recipe)
        return dataclasses.replace(config, emulate=self.emulate)

    def convert(self, module: nn.Module) -> nn.Module:
        """``module`` with its chosen linear layers made torchao's ``Float8Linear`` (in place,
        as torchao does; returned)."""
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if not (device.type == "cuda" or torch.cuda.is_available()):
            check_device(device, self.emulate, self.recipe == "rowwise")  # no GPU to move to
        float8 = torchao_float8()
        module = float8.convert_to_float8_training(module, config=self.config(),
                                                   module_filter_fn=self.filter)
        module = _differentiable_by_func(module, self.enable_fsdp_float8_all_gather)
        if not converted(module):
            raise ValueError(f"fp8: no linear layer of {type(module).__name__} passed the filter "
                             "(both dimensions multiples of 16, not lm_head/output): nothing "
                             "would train in float8; use precision='bf16-mixed'")
        return module


def _differentiable_by_func(module: nn.Module, float8_gather: bool) -> nn.Module:
    """``module`` with torchao's ``Float8Linear`` layers made fxtrain's
    (``fxtrain._torch.float8.Float8Linear``: the same parameters; in place, a module converted
    whole returned in its stead). ``float8_gather``: their configs say
    ``enable_fsdp_float8_all_gather``, which ``fx.shard`` reads; torchao's own wrapper of the
    weight (FSDP2's hooks) is not made: the weights stay plain parameters."""
    from .._torch.float8 import Float8Linear

    def made(layer: nn.Module) -> nn.Module:
        made = Float8Linear.from_float(layer, config=layer.config)
        made.config = dataclasses.replace(layer.config,
                                          enable_fsdp_float8_all_gather=float8_gather)
        return made

    if type(module) in _torchao_layers():
        return made(module)
    for name, layer in list(module.named_modules()):
        if type(layer) in _torchao_layers():
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, made(layer))
    return module


def _torchao_layers() -> tuple[type, ...]:
    from torchao.float8.float8_linear import Float8Linear
    return (Float8Linear,)


def converted(module: nn.Module) -> list[nn.Module]:
    """The ``Float8Linear`` layers of ``module``."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, Float8Linear)]


def check_device(device: torch.device, emulate: bool, rowwise: bool) -> None:
    """A clear refusal of float8 where ``device`` cannot multiply in it and emulation is not
    asked for."""
    if emulate or device_runs_float8(device, rowwise):
        return
    raise RuntimeError(device_refusal(device, rowwise))


def device_refusal(device: torch.device, rowwise: bool = False) -> str:
    """Why ``device`` cannot run float8 products (and what to do instead)."""
    if device.type == "cpu":
        why = (f"this torch ({torch.__version__}) runs them on the CPU with one scale per "
               "tensor only, not the 'rowwise' recipe's scales per row (torch 2.13 and later "
               "do); use the 'tensorwise' recipe ('fp8')" if rowwise else
               f"this torch ({torch.__version__}) does not run them on the CPU")
    else:
        what = (f"{torch.cuda.get_device_name(device)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
                if device.type == "cuda" else device.type)
        why = (f"they need a CUDA GPU of compute capability 8.9 or more (Ada, Hopper, "
               f"Blackwell) or the CPU; this step runs on {what}")
    return (f"precision 'fp8': float8 matrix products (torch._scaled_mm): {why}. "
            "fx.precision.float8(emulate=True) emulates them (float8 rounding, high-precision "
            "products), or train in 'bf16-mixed'")


def check_module(module: nn.Module, device: torch.device, name: str) -> None:
    """The state's model converted (``Float8Linear`` layers), on a device that runs them;
    eagerly, and while a compiled step is traced (``fail``: a compiled step on an unconverted
    model is refused before its first graph, as an eager one is)."""
    layers = converted(module)
    if not layers:
        fail(ValueError, f"precision={name!r} trains torchao's Float8Linear layers, and this "
                         "state's model has none: convert the model before making its state "
                         "(model = fx.precision.float8(...).convert(model); then "
                         "fx.TrainState.create(model, ...))")
    if not all(m.config.emulate for m in layers) and not device_runs_float8(
            device, _rowwise(layers)):
        fail(RuntimeError, device_refusal(device, _rowwise(layers)))


def check_autodiff(module: nn.Module, autodiff: str, name: str) -> None:
    """A clear refusal of ``torch.func``'s path for torchao's own ``Float8Linear`` layers (a
    model converted by ``convert_to_float8_training``, not by the policy), which it cannot
    differentiate; raised while a compiled step is traced too."""
    if autodiff != "func" or not any(type(m) in _torchao_layers() for m in module.modules()):
        return
    from .._torch.traced_errors import fail
    fail(ValueError, f"precision={name!r}: this model's layers are torchao's own Float8Linear "
                     "(convert_to_float8_training), whose autograd.Function torch.func cannot "
                     "differentiate (no setup_context): convert the float32 model with "
                     "fx.precision.float8(...).convert(model) instead, or build the step with "
                     "autodiff='autograd'")
