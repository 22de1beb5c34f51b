"""benchmarks/simulate.py's Tracker on context parallelism's ring (issue 79): it runs the custom
op ``fxtrain::ring_attention`` through its decomposition, so the keys and values the ring
gathers count as all-gather traffic and its buffers in the peak. As an opaque op the ring moved
nothing and held only its output; real and simulated ranks agree either way, so
tests/ranks/test_simulate_ranks.py cannot tell (it checks the whole step's traffic against the
same arithmetic). One call, in this process, on torch's fake process group and fake tensors."""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from fxtrain._torch.context_parallel import ring_attention
from helpers import imported

pytestmark = pytest.mark.needs_torch(2, 13, "context parallelism's ring attention")

CP, BATCH, HEADS, KV_HEADS, LOCAL, HEAD_DIM = 2, 1, 8, 2, 64, 16


def test_the_tracker_counts_the_rings_gathers_and_buffers():
    """Rank 0 of a ring of 2, grouped-query attention (8 query heads, 2 key and value heads:
    the ring passes the keys and values unrepeated). Torch's ring rotates them by all-gather
    (``_cp_options.rotate_method``'s default, ``_AllGatherRotater``): the forward gathers every
    rank's keys and values once, ``cp x (k + v)`` bytes, and so does the backward (the
    gradients go back by all-to-all, which the Tracker counts as none of its kinds). At the
    forward's gather the rank holds its keys and values flattened into one buffer to send
    (``k + v``) and the gathered one (``cp x (k + v)``) besides its inputs; the opaque op's
    peak held only its output and log-sum-exp (34,816 bytes here, under that bound)."""
    simulate = imported("simulate")
    kv = 2 * BATCH * KV_HEADS * LOCAL * HEAD_DIM * 4  # this rank's keys and values, float32
    dist.init_process_group("fake", rank=0, world_size=CP)
    try:
        with FakeTensorMode():
            q = torch.randn(BATCH, HEADS, LOCAL, HEAD_DIM, requires_grad=True)
            k, v = (torch.randn(BATCH, KV_HEADS, LOCAL, HEAD_DIM, requires_grad=True)
                    for _ in range(2))
            with simulate.Tracker([q, k, v]) as tracker:
                held = tracker.now  # the inputs
                out = ring_attention(q, k, v, dist.group.WORLD)
                moved, peak = dict(tracker.moved), tracker.peak
                out.sum().backward()
    finally:
        dist.destroy_process_group()
    assert held == BATCH * HEADS * LOCAL * HEAD_DIM * 4 + kv  # q, k and v
    assert moved == {"all_gather": CP * kv} == {"all_gather": 32_768}
    assert dict(tracker.moved) == {"all_gather": 2 * CP * kv}
    assert peak - held >= (1 + CP) * kv == 49_152, (peak, held)  # seen: 150,528
