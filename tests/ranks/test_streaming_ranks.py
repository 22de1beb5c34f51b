"""test_streaming's tests that run several ranks (the rest: tests/unit/test_streaming.py)."""

import hashlib
import json
import logging
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import dist_worker
import fxtrain as fx
from helpers import mlp
from helpers_distributed import digest, free_port, global_batches


@pytest.mark.slow
def test_a_stream_resumed_on_two_ranks_from_one_and_on_one_from_two_keeps_its_order(tmp_path):
    """The same global batch of 8 on 1 and on 2 gloo processes: a run checkpointed at step 7 on
    one layout and resumed on the other to step 15 (3 epochs of 5 batches, the cut inside the
    second) trains the examples an uninterrupted one-process run trains, batch by batch (their
    order's digest equal), and ends at its parameters within float32 rounding (the ranks'
    gradient mean against the global batch's)."""
    run = dist_worker.streamed
    run(tmp_path, [(str(tmp_path / "whole"), 15, "whole"), (str(tmp_path / "a"), 7, "a1")])
    mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), "streamed", (str(tmp_path),), {
        "runs": [(str(tmp_path / "a"), 15, "a2"), (str(tmp_path / "b"), 7, "b1")]}))
    run(tmp_path, [(str(tmp_path / "b"), 15, "b2")])
    whole, (reference,) = global_batches(tmp_path, "whole", 1)
    assert len(whole) == 15 and all(len(batch) == 8 for batch in whole)
    for epoch in range(3):  # each epoch: 40 distinct examples of the 44
        assert len(set(sum(whole[5 * epoch:5 * epoch + 5], []))) == 40
    one_then_two = global_batches(tmp_path, "a1", 1)[0] + global_batches(tmp_path, "a2", 2)[0]
    two_then_one = global_batches(tmp_path, "b1", 2)[0] + global_batches(tmp_path, "b2", 1)[0]
    assert digest(one_then_two) == digest(whole), (one_then_two, whole)
    assert digest(two_then_one) == digest(whole), (two_then_one, whole)
    a2 = global_batches(tmp_path, "a2", 2)[1]
    assert fx.tree_digest(a2[0]["params"]) == fx.tree_digest(a2[1]["params"])
    (b2,) = global_batches(tmp_path, "b2", 1)[1]
    for resumed in (a2[0], b2):
        for name, value in reference["params"].items():
            torch.testing.assert_close(resumed["params"][name], value, rtol=1e-5, atol=1e-6)
    changed = mlp(sizes=(8, 16, 4)).state_dict()  # and the run moved them: not a vacuous match
    assert not torch.allclose(changed["0.weight"], reference["params"]["0.weight"], atol=1e-3)
