"""torchao's float8 linear layer, differentiable under ``torch.func`` as under autograd.

Checked on torch 2.13.0 with torchao 0.18.0 (``fxtrain[fp8]`` pins ``torchao>=0.18,<0.19``).

torchao's ``Float8Linear`` multiplies through ``matmul_with_hp_or_float8_args``, an
``autograd.Function`` with the old ``forward(ctx, ...)`` and no ``setup_context``, and casts
through another (``_ToFloat8ConstrFunc``): ``torch.func``'s transforms refuse both. ``Linear``
here is that layer with the same forward, through ``MatMul``, the same computation as
torchao's (every cast and product in the same order, so the same bits on one machine) written
as ``torch.func`` wants it: ``forward`` without ``ctx`` and a ``setup_context``. Its backward
runs in a second such Function (``_Grads``), whose forward ``torch.func`` runs on plain
tensors: a float8 tensor made around the transform's own wrappers could not reach their
storage ("Cannot access storage of TensorWrapper"). A cast here makes torchao's
``Float8TrainingTensor`` directly, with no Function around it: inside a Function's forward
nothing is differentiated anyway.

Private names used, and why no public route: ``torchao.float8.float8_linear.Float8Linear``
(torchao marks it not public; its ``from_float`` is what ``convert_to_float8_training`` calls),
``Float8TrainingTensor`` and ``GemmInputRole`` (the float8 tensor torchao's products dispatch
on), ``float8_utils.tensor_to_scale`` / ``amax_to_scale`` / ``to_fp8_saturated`` (torchao's
dynamic scale and saturated cast, the arithmetic of ``hp_tensor_to_float8_dynamic`` without its
Function; ``fxtrain.distributed._float8_gather`` casts weight shards with them),
``distributed_utils.tensor_already_casted_to_fp8``; and torch's
``torch._dynamo.allow_in_graph``, as torchao marks its own Function: Dynamo then puts the
Function in the graph as a call and AOTAutograd traces it, where tracing into it failed on the
float8 tensor it makes ("RuntimeError when making fake tensor call"). If a torchao release
changes these, the float8 policy is refused at import by the version pin, not mid-trace.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.float8.config import ScalingGranularity, ScalingType
from torchao.float8.distributed_utils import tensor_already_casted_to_fp8
from torchao.float8.float8_linear import Float8Linear as TorchaoFloat8Linear
from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole
from torchao.float8.float8_utils import amax_to_scale, tensor_to_scale, to_fp8_saturated

INPUT, WEIGHT, GRAD_OUTPUT = GemmInputRole.INPUT, GemmInputRole.WEIGHT, GemmInputRole.GRAD_OUTPUT


def cast(t: torch.Tensor, how: Any, mm_config: Any, role: Any, dim: int,
         config: Any) -> torch.Tensor:
    """``t`` as torchao's float8 tensor, cast as ``how`` (a ``CastConfig``) says, scaled along
    ``dim`` if rowwise; as it is where it is float8 already or ``how`` disables the cast
    (torchao's ``hp_tensor_to_float8_dynamic``, without its autograd Function)."""
    if tensor_already_casted_to_fp8(t) or how.scaling_type is ScalingType.DISABLED:
        return t
    axis = dim if how.scaling_granularity is ScalingGranularity.AXISWISE else None
    scale = tensor_to_scale(t, how.target_dtype, scaling_granularity=how.scaling_granularity,
                            axiswise_dim=axis,
                            round_scales_to_power_of_2=config.round_scales_to_power_of_2)
    return from_bits(to_fp8_saturated(t.to(torch.float32) * scale, how.target_dtype), scale,
                     t.dtype, mm_config, role, axis)


def from_bits(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, mm_config: Any,
              role: Any = WEIGHT, axis: int | None = None) -> torch.Tensor:
    """torchao's float8 tensor of float8 ``bits`` and their ``scale``, standing for a tensor
    of ``dtype`` (``bits / scale``)."""
    return Float8TrainingTensor(bits, scale, dtype, linear_mm_config=mm_config,
                                gemm_input_role=role, axiswise_dim=axis)


class _WithGradient(torch.autograd.Function):
    """``with_gradient_to``'s Function: the float8 tensor out, its gradient passed through."""

    @staticmethod
    def forward(like: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor,
                mm_config: Any) -> torch.Tensor:
        return from_bits(bits, scale, like.dtype, mm_config)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        del ctx, inputs, output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None, None


def with_gradient_to(like: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor,
                     mm_config: Any) -> torch.Tensor:
    """torchao's float8 weight of ``bits`` and ``scale`` (``from_bits``), standing for
    ``like``'s dtype, whose gradient (in that dtype) goes to ``like`` (as torchao's cast
    passes it to the tensor it casts)."""
    return _WithGradient.apply(like, bits, scale, mm_config)


@torch._dynamo.allow_in_graph
class ScatteredBack(torch.autograd.Function):
    """The way back of a gathered float8 weight's gradient (``with_gradient_to``): a shard in,
    a tensor of the whole weight's ``rows`` and ``dtype`` out that holds nothing (zeros
    expanded); the backward reduce-scatters (sums) the whole weight's gradient over the
    ``group_size`` ranks of the process group named ``group`` in ``reduce_dtype`` (padded to
    ``padded`` rows, the ranks' equal shards), onto the shard, in its dtype. In the graph as a
    call (``allow_in_graph``), so that AOTAutograd traces its backward as the step's own, where
    the forward, loss and backward graph's recomputation pass finds it: traced by Dynamo, its
    collectives were not marked as the backward's ("2 disjoint backward regions")."""

    @staticmethod
    def forward(shard: torch.Tensor, rows: int, padded: int, group_size: int, group: str,
                dtype: torch.dtype, reduce_dtype: torch.dtype) -> torch.Tensor:
        del padded, group_size, group, reduce_dtype  # the backward's
        return shard.new_zeros((), dtype=dtype).expand(rows, *shard.shape[1:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        shard, ctx.rows, ctx.padded, ctx.group_size, ctx.group, _, ctx.reduce_dtype = inputs
        ctx.held, ctx.shard_dtype = shard.shape[0], shard.dtype

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        from .collectives import reduce_scattered
        grad = grad.to(ctx.reduce_dtype)
        if ctx.padded > ctx.rows:
            grad = torch.nn.functional.pad(grad, (*([0, 0] * (grad.ndim - 1)), 0,
                                                  ctx.padded - ctx.rows))
        mine = reduce_scattered(grad.contiguous(), ctx.group_size, ctx.group)
        return mine[:ctx.held].to(ctx.shard_dtype), None, None, None, None, None, None


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for an ``a`` of any leading dimensions, through a 2-D ``torch.mm``."""
    out = torch.mm(a.reshape(-1, a.shape[-1]), b)
    return out.reshape(*a.shape[:-1], out.shape[-1])


@torch._dynamo.allow_in_graph
class MatMul(torch.autograd.Function):
    """``input @ weight_t`` with both cast to float8 as ``config`` says (torchao's
    ``matmul_with_hp_or_float8_args``)."""

    @staticmethod
    def forward(x: torch.Tensor, w_t: torch.Tensor, mm_config: Any,
                config: Any) -> torch.Tensor:
        return _mm(cast(x, config.cast_config_input, mm_config, INPUT, -1, config),
                   cast(w_t, config.cast_config_weight, mm_config, WEIGHT, 0, config))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        x, w_t, ctx.mm_config, ctx.config = inputs
        ctx.save_for_backward(x, w_t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, w_t = ctx.saved_tensors
        return (*_Grads.apply(grad, x, w_t, ctx.mm_config, ctx.config), None, None)


@torch._dynamo.allow_in_graph
class _Grads(torch.autograd.Function):
    """``MatMul``'s gradients with respect to the input and the (transposed) weight, each
    product's operands cast as torchao casts them; not differentiable again."""

    @staticmethod
    def forward(grad: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, mm_config: Any,
                config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        c = config
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.mm(
            cast(g, c.cast_config_grad_output, mm_config, GRAD_OUTPUT, -1, c),
            cast(w_t, c.cast_config_weight_for_grad_input, mm_config, WEIGHT, -1, c).t())
        grad_w = torch.mm(
            cast(g, c.cast_config_grad_output_for_grad_weight, mm_config, GRAD_OUTPUT, 0, c).t(),
            cast(x.reshape(-1, x.shape[-1]), c.cast_config_input_for_grad_weight, mm_config,
                 INPUT, 0, c))
        return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), grad_w.t()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        del ctx, inputs, output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        raise RuntimeError("float8 linear layers have no second derivative (as torchao's)")


class Float8Linear(TorchaoFloat8Linear):
    """torchao's ``Float8Linear`` (a subclass: torchao's helpers know it) multiplying through
    ``MatMul`` (see the module); made with ``Float8Linear.from_float(layer,
    config=layer.config)`` from torchao's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled():  # torchao's: CUDA's autocast dtype, CUDA's only
            input = input.to(torch.get_autocast_dtype("cuda"))
        output = MatMul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
        return output if self.bias is None else output + self.bias.to(output.dtype)


def float8_gathered(module: torch.nn.Module) -> frozenset[str]:
    """The names of ``module``'s weights that ``fx.shard`` gathers in float8: those of
    fxtrain's float8 layers whose config says ``enable_fsdp_float8_all_gather``."""
    return frozenset(f"{name}.weight" if name else "weight" for name, m in module.named_modules()
                     if isinstance(m, Float8Linear) and m.config.enable_fsdp_float8_all_gather)


def weight_scale(amax: torch.Tensor, config: Any) -> torch.Tensor:
    """The scale of a weight whose absolute maximum is ``amax``, as a layer of ``config``
    casts its weight (torchao's ``amax_to_scale``)."""
    return amax_to_scale(amax, config.cast_config_weight.target_dtype,
                         config.round_scales_to_power_of_2)


def weight_bits(t: torch.Tensor, scale: torch.Tensor, config: Any) -> torch.Tensor:
    """``t`` scaled by ``scale`` and cast to the float8 weight dtype of ``config``, saturated
    (the bits of torchao's cast)."""
    return to_fp8_saturated(t.to(torch.float32) * scale, config.cast_config_weight.target_dtype)
