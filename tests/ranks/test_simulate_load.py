"""benchmarks/simulate_load.py against real ranks: the bytes a simulated rank 0 holds after
fx.from_pretrained loads a sparse folder (fake group, fake tensors, slices not read) equal, part
by part, what rank 0 of 2 real gloo ranks holds after loading the same folder (its holes read
as zeros), with and without the optimizer offloaded; and the 8B/70B folder's headers are what
the code reads (the folder the rows are measured on is checked by fx.from_pretrained's own
reader)."""

import json

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import offload_worker
from helpers import BENCHMARKS, extra, imported
from helpers_distributed import free_port

transformers = extra("transformers")


@pytest.mark.slow
def test_a_small_models_simulated_load_holds_what_real_ranks_hold(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the ranks import simulate_load
    bench = imported("simulate_load")
    folder = tmp_path / "tiny"
    total = bench.sparse_folder("tiny", folder, dtype=torch.float32, file_bytes=200_000)
    assert len(list(folder.glob("*.safetensors"))) > 1  # an index over several files
    assert sum(f.stat().st_blocks * 512 for f in folder.glob("*.safetensors")) < total
    simulated = bench.run("tiny", 2, str(folder))
    mp.spawn(dist_worker.spawned, nprocs=2, args=(2, free_port(), offload_worker.loaded_bytes,
                                                  (str(tmp_path), str(folder)), {}))
    real = json.loads((tmp_path / "rank0.json").read_text())
    for sim, got in zip(simulated, real):
        assert sim["offload"] == got["offload"]
        for part in ("params", "buffers", "opt_state", "largest_slice"):
            assert sim[part] == got[part] > 0, (part, sim, got)
        # the load's peak is the state it ends with: no slice outlives its shard; the
        # optimizer's scalars (its count) are real tensors the peak leaves out
        assert 0 <= sim["params"] + sim["opt_state"] - sim["peak"] < 1024, sim


def test_the_sparse_folders_headers_are_the_models_shapes(tmp_path):
    """The 8B folder the simulation loads: every tensor of the model at its shape, in
    bfloat16, over files of at most 5 GB, read back by fx.from_pretrained's folder reader, and
    a few kilobytes on disk."""
    bench = imported("simulate_load")
    from fxtrain.apps import _hf_folder
    total = bench.sparse_folder("llama3-8b", tmp_path)
    folder = _hf_folder.read(tmp_path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(bench.config("llama3-8b"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(e.shape) for k, e in folder.entries.items()} == shapes
    assert {e.dtype for e in folder.entries.values()} == {torch.bfloat16}
    assert total == 2 * sum(p.numel() for p in model.state_dict().values())
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 4 and max(f.stat().st_size for f in files) <= 5 * 10**9 + 10**6
    assert sum(f.stat().st_blocks * 512 for f in files) < 10**6
