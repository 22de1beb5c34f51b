"""The rank jobs of the tests that load ``pretrained_worker``'s saved models onto ranks
(``pretrained_jobs``, a fixture tests/conftest.py offers every test: tests/ranks/
test_from_pretrained_ranks.py, test_offload_ranks.py and test_lora_ranks.py read it)."""

import pytest
import torch.multiprocessing as mp

import dist_worker
from helpers import once_per_run
from helpers_distributed import free_port

# test_from_pretrained_ranks.py's layouts: (model, layout)
LOADED = {2: [(m, layout) for m in ("llama", "llama_tied") for layout in ("units", "whole", "tp")]
          + [("gpt2", "units"), ("gpt2", "whole")],
          4: [("llama", "fsdp_tp"), ("llama_tied", "fsdp_tp"), ("llama_tied", "hsdp"),
              ("gpt2", "hsdp"), ("llama", "units")]}
# test_offload_ranks.py's: (model, layout, optimizer, compiled)
OFFLOADED = {2: [("llama", "units", "adamw", False), ("llama_tied", "whole", "clipped", False),
                 ("llama", "units", "clipped", True), ("llama", "tp", "adamw", False)],
             4: [("llama", "fsdp_tp", "adamw", False), ("llama_tied", "hsdp", "clipped", False)]}
# test_lora_ranks.py's: (layout, compiled); whole: tests/unit/test_lora_shards.py
LORA = {2: [("units", False), ("units", True), ("tp", True)],
        4: [("hsdp", False), ("fsdp_tp", False)]}


def saved_models(tmp_path_factory):
    """``pretrained_worker.models()`` saved by save_pretrained, once per run."""
    import pretrained_worker
    return once_per_run(tmp_path_factory, "pretrained_models", pretrained_worker.save_models)


def loaded_cases(world):
    """LOADED[world], less the per-block layouts before torch 2.13 (compiled units refused)."""
    from fxtrain._torch.version import at_least
    return [c for c in LOADED[world] if at_least(2, 13) or c[1] != "units"]


@pytest.fixture(scope="module")
def pretrained_jobs(tmp_path_factory):
    """The rank jobs of the tests above, each writing into its own folder of the one returned
    (``<name><world>/``: "loaded2", "offloaded4", "lora2", ...; "fault2" and "export2", with
    its checkpoint in "export_ckpt"): the 2-rank ones in one launch, the 4-rank ones in another
    (``dist_worker.several``; a 4-rank launch alone costs about 30 CPU-s, a 2-rank one 7).
    Once per run."""
    import lora_worker  # here, not at the import of this module (tests/conftest.py's)
    import offload_worker
    import pretrained_worker
    saved = saved_models(tmp_path_factory)

    def make(out):
        for world in (2, 4):
            jobs = []
            for name, fn, cases in (("loaded", pretrained_worker.compared, loaded_cases(world)),
                                    ("offloaded", offload_worker.compared, OFFLOADED[world]),
                                    ("lora", lora_worker.lora_layouts, LORA[world])):
                folder = out / f"{name}{world}"
                folder.mkdir()
                if name == "offloaded":
                    (folder / "ckpt").mkdir()
                    args = (str(folder), str(saved), cases, str(folder / "ckpt"))
                elif name == "lora":
                    args = (str(folder), str(saved / "llama"), cases)
                else:
                    args = (str(folder), str(saved), cases)
                jobs.append((fn, args, {}))
            if world == 2:
                (out / "export2").mkdir()
                jobs.append((pretrained_worker.trained_and_saved,
                             (str(out / "export2"), str(saved), str(out / "export_ckpt")), {}))
                (out / "fault2").mkdir()  # last: every rank raises inside it (and catches)
                jobs.append((pretrained_worker.damaged_on_one_rank,
                             (str(out / "fault2"), str(saved)), {}))
            mp.spawn(dist_worker.spawned, nprocs=world,
                     args=(world, free_port(), "several", (jobs,), {}))

    return once_per_run(tmp_path_factory, "pretrained_jobs", make)
