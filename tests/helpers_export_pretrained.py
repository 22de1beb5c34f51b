"""A trained and checkpointed tiny GPT-2 and its Hugging Face export read back, shared by
tests/unit/test_export_pretrained.py and its e2e and ranks counterparts (transformers: a skip
where it is not installed)."""

import torch

import dist_worker
import fxtrain as fx
from helpers import extra


# -- test_export_pretrained.py's helpers ----------------------------------------------------------

transformers = extra("transformers")


IDS = torch.arange(12).reshape(2, 6) % 40


def trained(tmp_path, steps=2):
    """A tiny GPT-2 trained ``steps`` steps and checkpointed: the state and the manager's
    directory."""
    state = fx.TrainState.create(dist_worker.tiny_gpt2(), fx.optim.adamw(1e-2))
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    with fx.checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        state = fx.fit(state, fx.make_train_step(dist_worker.gpt2_loss),
                       fx.data.Batches(ids, 2, seed=0), max_steps=steps, checkpoint=manager)
    return state, tmp_path / "ckpt"


def loaded(folder):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched names
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits
