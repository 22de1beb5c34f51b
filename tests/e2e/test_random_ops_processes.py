"""test_random_ops's tests that run processes (the rest: tests/unit/test_random_ops.py)."""

import pytest

from helpers_remat import ATTENTION_PROBE


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="needs Linux's /proc")
def test_keyed_attention_dropout_keeps_no_attention_matrix_per_layer():
    """Torch's fused kernels draw attention dropout inside the kernel and keep no attention
    matrix; the keyed math kept 2.4 per layer (the float32 dropped weights, the softmax's
    output, the boolean mask): 81 MB at 2 layers, 161 MB at 6. Recomputed in the backward from
    q, k and the key, one layer's exists at a time: 61 MB and 65 MB (torch 2.13)."""
    from helpers_remat import step_peak_bytes

    shallow, deep = (step_peak_bytes(ATTENTION_PROBE, str(d)) for d in (2, 6))
    block = 2 * 4 * 512 * 512 * 4
    assert deep - shallow < block, f"{(deep - shallow) / 1e6:.0f} MB more for 4 more layers"
