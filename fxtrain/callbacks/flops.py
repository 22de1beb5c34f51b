"""FLOPs of a training step, and the peak FLOP/s of known GPUs: what ``throughput`` needs for MFU.

``count_step_flops`` counts with ``torch.utils.flop_counter.FlopCounterMode``, eagerly. It
cannot count a compiled step: under a ``TorchDispatchMode`` Dynamo compiles nothing (torch 2.13
skips every frame, "non-infra torch dispatch mode present", so a ``fullgraph=True`` step raises),
and a compiled graph's kernels never pass through the mode anyway. So it runs the loss function
once, forward and backward exactly as ``fx.make_train_step`` differentiates it
(``torch.func.grad_and_value`` with respect to the parameters), on one batch.

FlopCounterMode counts matrix products, convolutions and attention (the FLOPs MFU is defined
over, PaLM appendix B); elementwise work (activations, norms, the optimizer update) counts 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ..data._feed import to_device

T = 1e12
# Dense (no 2:4 sparsity) peak FLOP/s per GPU, from NVIDIA's datasheets (their tensor-core
# figures are quoted "with sparsity": halved here). "fp32" is the non-tensor-core rate (torch's
# default float32 matmul precision, "highest"); "tf32" is float32 with
# torch.set_float32_matmul_precision("high").
#   H100 SXM, H100 PCIe, H100 NVL: nvidia.com/en-us/data-center/h100 (datasheet table)
#   H200, H200 NVL: nvidia.com/en-us/data-center/h200 (same rates as H100 SXM / NVL)
#   A100 (SXM and PCIe, 40 and 80 GB): nvidia.com/en-us/data-center/a100 (datasheet table)
#   L40S: nvidia.com/en-us/data-center/l40s; L4: nvidia.com/en-us/data-center/l4
# Matched against torch.cuda.get_device_name() in this order (the first match wins):
# "NVIDIA H100 80GB HBM3" is an SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756 * T, "fp16": 756 * T, "tf32": 378 * T, "fp32": 51 * T}),
    (r"H100.*NVL", {"bf16": 835 * T, "fp16": 835 * T, "tf32": 418 * T, "fp32": 60 * T}),
    (r"H200.*NVL", {"bf16": 835 * T, "fp16": 835 * T, "tf32": 418 * T, "fp32": 60 * T}),
    (r"H100|H200", {"bf16": 989 * T, "fp16": 989 * T, "tf32": 495 * T, "fp32": 67 * T}),
    (r"A100", {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}),
    (r"L40S", {"bf16": 362 * T, "fp16": 362 * T, "tf32": 183 * T, "fp32": 91.6 * T}),
    (r"\bL4\b", {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T}),
)

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", "tf32": "tf32",
           "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def device_peak_flops(device: torch.device | str | None = None,
                      dtype: torch.dtype | str = torch.bfloat16) -> float | None:
    """The dense peak FLOP/s of a known GPU at ``dtype``, or None (a CPU, an unknown GPU).

    Args:
      device: a CUDA device (default: the current one, when CUDA is available), or a GPU's
        name as ``torch.cuda.get_device_name`` gives it.
      dtype: ``torch.bfloat16`` (the usual MFU reference), ``torch.float16``, ``torch.float32``
        (without tensor cores), or ``"tf32"``.

    Examples:
        >>> fx.callbacks.device_peak_flops("NVIDIA H100 80GB HBM3")  # an H100 SXM, bf16 dense
        989000000000000.0
        >>> fx.callbacks.device_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32)
        19500000000000.0
        >>> fx.callbacks.device_peak_flops("cpu") is None
        True
    """
    key = _DTYPES.get(dtype)
    if key is None:
        raise ValueError(f"device_peak_flops: dtype must be one of torch.bfloat16, "
                         f"torch.float16, torch.float32 or 'tf32', got {dtype!r}")
    name = _device_name(device)
    if name is None:
        return None
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks[key]
    return None


def _device_name(device: torch.device | str | None) -> str | None:
    """The GPU's name for ``device``: None for a CPU (or no CUDA); a plain name is returned."""
    if isinstance(device, str) and not re.fullmatch(r"cuda(:\d+)?|cpu|mps|meta|xpu(:\d+)?",
                                                     device):
        return device
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def count_step_flops(loss_fn: Callable[..., Any], state: Any, batch: Any) -> int:
    """The FLOPs of one training step of ``loss_fn`` on ``batch``: its forward and its backward
    with respect to ``state.params``, counted eagerly by ``FlopCounterMode``.

    Pass the result to ``fx.callbacks.throughput(flops_per_step=...)``. It runs the loss
    function once (a compiled step cannot be counted, see the module's docstring); the state is
    read, not changed. One batch of the size the run trains on: FLOPs grow with it. Under data
    parallelism, the batch of one process (throughput and MFU are per process).

    A linear layer of ``n_in -> n_out`` costs ``2·n_in·n_out`` FLOPs per example forward, and
    twice that backward (gradients of its input and of its weight); the first layer skips its
    input's gradient, which nothing needs (so the "3x forward" rule of thumb is an upper bound).

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> state = fx.TrainState.create(nn.Linear(8, 4), fx.optim.sgd(0.1))
        >>> batch = (torch.randn(32, 8), torch.randn(32, 4))
        >>> fx.callbacks.count_step_flops(loss_fn, state, batch)  # 2 * 32 * 8 * 4 * (1 + 1)
        4096
    """
    if not callable(loss_fn):
        raise TypeError(f"count_step_flops: loss_fn must be callable loss_fn(state, params, "
                        f"batch), got {loss_fn!r}")
    from torch.utils.flop_counter import FlopCounterMode
    device = next(iter(state.params.values())).device if state.params else None
    batch = to_device(batch, device) if device is not None else batch

    def loss(params):
        # views, not leaves: FlopCounterMode's module hooks fail on a leaf fed to a submodule
        # (a learned input, latents, queries) under torch.func.grad
        out = loss_fn(state, {k: v.view_as(v) for k, v in params.items()}, batch)
        return out[0] if isinstance(out, tuple) else out  # (loss, aux): the loss

    counter = FlopCounterMode(display=False)
    with counter:
        torch.func.grad_and_value(loss)(dict(state.params))
    return int(counter.get_total_flops())
