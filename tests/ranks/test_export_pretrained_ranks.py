"""test_export_pretrained's tests that run several ranks (the rest: tests/unit/test_export_pretrained.py)."""

import json
import pytest
import torch
import torch.multiprocessing as mp
import dist_worker
import fxtrain as fx
from fxtrain import cli
from helpers import extra
from helpers_distributed import free_port
from helpers_export_pretrained import loaded, logits


@pytest.mark.slow
def test_a_checkpoint_sharded_over_two_ranks_exports_from_one_process(tmp_path):
    """The 2-rank run's sharded checkpoint (fx.shard's default layout, trained by the default
    step compiled), exported without a process group, loads with the logits of that checkpoint
    restored onto one process."""
    mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), "sharded_gpt2_saves",
                                                   (str(tmp_path), str(tmp_path / "ckpt")), {}))
    from fxtrain.checkpoint import layout
    from fxtrain._torch.version import at_least
    assert layout.is_sharded_checkpoint(tmp_path / "ckpt" / "3")
    ran = torch.load(tmp_path / "rank0.pt")
    # fx.shard's default: per block where torch compiles it, with the default step, one graph
    assert ran["units"] == (["transformer.h.0", "transformer.h.1"] if at_least(2, 13) else [])
    assert ran["graphs"] == 1
    like = fx.TrainState.create(dist_worker.tiny_gpt2(seed=1), fx.optim.adamw(1e-2))
    restored = fx.checkpoint.restore(tmp_path / "ckpt" / "3", like=like.replace(
        data=fx.data.Batches(torch.zeros(8, 12, dtype=torch.long), 2).init()))
    assert not torch.equal(restored.params["transformer.wte.weight"],
                           like.params["transformer.wte.weight"])
    out = fx.export_pretrained(tmp_path / "ckpt", tmp_path / "hf")
    assert torch.equal(logits(loaded(out)), logits(fx.trained_module(restored).eval()))
