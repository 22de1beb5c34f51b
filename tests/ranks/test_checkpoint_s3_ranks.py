"""A sharded checkpoint written to object storage by two ranks (each uploads its own shards;
rank 0 commits the step), against moto's S3 server (tests/helpers_s3.py), then read without a
process group: restored onto one process and exported with ``fxtrain export``."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import fxtrain as fx
from fxtrain import cli
from helpers import extra
from helpers_distributed import free_port
from helpers_export_pretrained import loaded, logits
from helpers_s3 import BUCKET, environment, make_bucket, objects, server, \
    sharded_gpt2_saves_async


@pytest.mark.slow
def test_two_ranks_save_shards_to_s3_asynchronously_and_fxtrain_export_reads_them(
        tmp_path, monkeypatch, capsys):
    extra("s3fs")
    extra("moto")
    extra("transformers")
    with server() as endpoint:
        make_bucket(endpoint)
        for k, v in environment(endpoint).items():  # the ranks inherit it
            monkeypatch.setenv(k, v)
        url = f"s3://{BUCKET}/sharded"
        mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), sharded_gpt2_saves_async,
                                                       (str(tmp_path), url), {}))
        ran = torch.load(tmp_path / "rank0.pt")
        assert ran == {"steps": [3], "step": 3}  # step 2 saved, then retired by keep_latest=1
        keys = objects("sharded")
        assert {k.split("/")[2] for k in keys} == {"3"}
        shards = sorted(k.rsplit("/", 1)[1] for k in keys if "/shards/" in k)
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank's own
        info = fx.checkpoint.CheckpointManager(url).info()
        assert info["world_size"] == 2 and info["step"] == 3

        like = fx.TrainState.create(dist_worker.tiny_gpt2(seed=1), fx.optim.adamw(1e-2))
        restored = fx.checkpoint.restore(url, like=like.replace(
            data=fx.data.Batches(torch.zeros(8, 12, dtype=torch.long), 2).init()))
        assert int(restored.step) == 3
        assert not torch.equal(restored.params["transformer.wte.weight"],
                               like.params["transformer.wte.weight"])
        assert cli.main(["export", url, str(tmp_path / "hf")]) == 0
        assert "wrote" in capsys.readouterr().out
        assert torch.equal(logits(loaded(tmp_path / "hf")),
                           logits(fx.trained_module(restored).eval()))
