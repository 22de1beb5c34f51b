"""scripts/guarded_step.py's fence (issue 74's check for kernels that read outside their
tensors or read what no kernel wrote): a fenced tensor is NaN until written, sits against its
guard page, and takes the strides asked for."""

import torch

from helpers import script_module


def _script():
    return script_module("guarded_step")


def test_a_fenced_tensor_is_nan_until_written_and_ends_at_its_guard_page():
    script = _script()
    for side in ("end", "start"):
        t = script.fenced((3, 5), (5, 1), torch.float32, side)
        assert t.shape == (3, 5) and t.stride() == (5, 1) and t.isnan().all()
        t.copy_(torch.arange(15.0).view(3, 5))
        assert torch.equal(t, torch.arange(15.0).view(3, 5))
        end = t.data_ptr() + 15 * 4
        start = t.data_ptr()
        assert (end if side == "end" else start) % script.PAGE == 0  # touches the guard
    bf16 = script.fenced((4,), (2,), torch.bfloat16)  # strided: 7 elements behind 4
    assert bf16.isnan().all() and bf16.stride() == (2,)
