"""Whether this torch multiplies float8 on the CPU: ``torch._scaled_mm`` tried once.

Checked on torch 2.11.0, 2.13.0 and 2.15.0. ``torch._scaled_mm`` (private; the product torchao's
float8 layers call, no public counterpart) runs on the CPU through oneDNN: with one scale per
tensor on all three, with a scale per row (torchao's ``rowwise`` recipe) from 2.13 (2.11: "Now
_scaled_mm only supports per-tensor scaling"). Where it is missing or refuses, the answer is no,
and the float8 policy is refused on the CPU unless emulated.
"""

from __future__ import annotations

import functools

import torch

from .traced_errors import run_while_tracing


@run_while_tracing  # a constant to a compiled step, the probe run for real
def cpu_runs_float8(rowwise: bool) -> bool:
    """Whether this torch multiplies float8 on the CPU with one scale per tensor, or per row
    (``rowwise``): torch 2.11 to 2.15 run ``torch._scaled_mm`` on the CPU per tensor (oneDNN),
    2.13 and later per row too; a 16 x 16 product tried once per process says so."""
    return _cpu_product_runs(rowwise)


@functools.cache
def _cpu_product_runs(rowwise: bool) -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    scales = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.ones(()),) * 2
    try:
        torch._scaled_mm(a, a.t(), scale_a=scales[0], scale_b=scales[1],
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True
