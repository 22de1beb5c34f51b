"""Inductor's choice of the CPU's vector instructions on torch 2.11 and 2.12, made with the probe of
torch 2.13, for ``fx.precompiled``.

Before Inductor compiles or loads C++ for the CPU, it picks the widest vector instructions
(AVX-512 with VNNI, AVX2, ...) that both the CPU and this torch can use, once per process
(``torch._inductor.cpu_vec_isa.valid_vec_isa_list``): for each set ``/proc/cpuinfo`` lists, it
builds a small probe library into its cache (once: a file of ``fx.precompiled`` carries them,
``fxtrain._torch.binaries``) and loads it in a fresh Python. On torch 2.11 and 2.12 that Python
imports torch first (``VecISA._avx_py_load``): six imports on an AVX-512 machine, 27 of the 29
CPU-seconds a small step's warm start took there (benchmarks/RESULTS.md, issue 62). Torch 2.13
loads the probe library without importing torch, the loader pointed at this torch's libraries.

``pick`` lets Inductor make its own choice (its probes, in its order, after its checks of the
CPU, the answer kept where it keeps it) while each probe's fresh Python loads this torch's
``libtorch_cpu`` by its path and then the probe library, as 2.13's does, instead of importing
torch. What that trusts: that a probe library that loads beside ``libtorch_cpu`` alone loads
after ``import torch`` too, as torch 2.13 and later trust. A probe still runs in a process of
its own, so one that fails or crashes answers no, as before; the answer is Inductor's to keep
for the process, as it would be after its own probes.

Checked on torch 2.11.0 and 2.12.0 (private: ``VecISA._avx_py_load``, the script a probe's
Python runs with the library's path for ``__lib_path__``, and ``valid_vec_isa_list``). Elsewhere
(torch 2.13 and later, another platform than Linux, a torch whose probe script or library
differs) ``pick`` does nothing, and Inductor probes as that torch does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .traced_errors import run_while_tracing
from .version import at_least

NEEDED = sys.platform == "linux" and not at_least(2, 13)
"""Whether this torch's probes import torch (see the module)."""

LOAD = """
import ctypes
ctypes.CDLL({torch_cpu!r})  # this torch's, which the probe library needs
ctypes.CDLL("__lib_path__")
"""
"""The script a probe's Python runs instead of torch 2.11's ``import torch`` and load."""


_picked = False


def pick() -> None:
    """Inductor's choice of vector instructions for this process, made now with torch 2.13's
    probe where this torch's imports torch (see the module); nothing where that is made
    already or elsewhere."""
    global _picked
    if not NEEDED or _picked:
        return
    _picked = True
    from torch._inductor import cpu_vec_isa

    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    probe = cpu_vec_isa.VecISA
    script = getattr(probe, "_avx_py_load", None)
    if not (isinstance(script, str) and "__lib_path__" in script and torch_cpu.is_file()):
        return  # not the probe this module was checked on
    probe._avx_py_load = LOAD.format(torch_cpu=str(torch_cpu))
    try:
        cpu_vec_isa.valid_vec_isa_list()
    finally:
        probe._avx_py_load = script


@run_while_tracing
def pick_for(device_type: str) -> bool:
    """``pick()`` for a compiled step on the CPU (``device_type`` its state's), run for real
    while Dynamo traces it, before Inductor compiles it: on torch 2.11 and 2.12 every process's
    first Inductor compile for the CPU otherwise probes with torch's imports (the ``--smoke``
    MLP's warm first step on torch 2.11: 18.1 CPU-s with them, 4.0 without; issue 62).
    Nothing for another device, whose compiles need no probe."""
    if device_type == "cpu":
        pick()
    return True


# -- bfloat16 tiles at 512 bits ---------------------------------------------------------------

BFLOAT16_SIMDLEN = 256
"""The vector width Inductor is given for a step that computes in bfloat16 on an AVX-512 CPU
(``bfloat16_options``)."""


def vector_bits() -> int:
    """The width of the vectors Inductor compiles this process's CPU kernels for (512 on an
    AVX-512 CPU, 256 on AVX2; 0 without vectors): its own choice
    (``torch._inductor.cpu_vec_isa.pick_vec_isa``, private, checked on torch 2.11 to 2.15)."""
    pick()
    from torch._inductor import cpu_vec_isa
    isa = cpu_vec_isa.pick_vec_isa()
    return int(isa.bit_width()) if isa else 0


def bfloat16_options(bits: int) -> dict[str, int]:
    """Inductor's options for a compiled step that computes in bfloat16 on a CPU whose kernels
    are ``bits`` wide: at 512, ``cpp.simdlen=256``; else none.

    Why: at 512 bits Inductor moves a transposed bfloat16 operand in 32 x 32 tiles
    (``at::vec::transpose_mxn<BFloat16, 32, 32>``), and a kernel that loads such a tile twice
    (a step's graph keeps the attention's ``k^T`` for the forward and for the backward) came
    out of GCC 12.2 wrong: measured on an Intel Xeon with AVX512-BF16, torch 2.13.0 and 2.15.0,
    a kernel with two such tiles returned garbage where the same kernel with one returned the
    transpose, and the demo's transformer under ``bf16-mixed`` trained to NaN at its first
    compiled step (eager and ``aot_eager`` exact; so too at 256 bits, where the tile is moved
    element by element)."""
    return {"cpp.simdlen": BFLOAT16_SIMDLEN} if bits > BFLOAT16_SIMDLEN else {}
