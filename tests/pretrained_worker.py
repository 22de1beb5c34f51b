"""The ranks' side of tests/ranks/test_from_pretrained_ranks.py: a folder saved by
``save_pretrained`` loaded by ``fx.from_pretrained`` and by the whole-model path
(``from_pretrained`` + ``TrainState.create`` + ``fx.shard``), compared on every rank."""

import json
import os

import torch
import torch.utils._pytree as pytree

import fxtrain as fx

# the layouts each model is loaded in: fx.shard's keywords, and the mesh (None: 1-D)
LAYOUTS = {
    "units": ({}, None),
    "whole": ({"units": "whole"}, None),
    "tp": ({"tp_plan": "auto"}, None),
    "fsdp_tp": ({"tp_plan": "auto"}, ("dp", "tp")),
    "hsdp": ({}, ("replicate", "shard")),
}


def models():
    """The models the tests save: a Llama with untied and with tied embeddings (a vocabulary
    of 37: rows split unevenly over 2 and 4 ranks) and a GPT-2 (tied, Conv1D layers)."""
    import transformers
    llama = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                 use_cache=False)
    return {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)),
        "llama_tied": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**llama, tie_word_embeddings=True)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=16, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)),
    }


def save_models(folder):
    """Each of ``models()`` saved into ``folder/<name>`` in files of at most 20 kB (an index
    and several files)."""
    for i, (name, make) in enumerate(models().items()):
        torch.manual_seed(i)
        make().save_pretrained(f"{folder}/{name}", max_shard_size="20KB")


def _loss(state, params, batch):
    return state.apply(params, input_ids=batch, labels=batch).loss


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _same(a, b):
    """Whether two trees hold the same leaves on this rank: the same placements and local
    shapes, bit for bit."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if type(x) is not type(y) or getattr(x, "placements", None) != getattr(
                y, "placements", None):
            return False
        if isinstance(x, torch.Tensor) and not (
                _local(x).dtype == _local(y).dtype and torch.equal(_local(x), _local(y))):
            return False
    return True


def compared(out, folder, cases, steps=5):
    """For each ``(model, layout)`` of ``cases``: the state ``fx.from_pretrained`` loads
    against the whole-model path's, leaf for leaf on this rank, and both after ``steps`` eager
    AdamW steps (losses and state); writes ``out/rank<r>.json``."""
    import transformers
    from fxtrain.sharding import mesh as make_mesh
    ids = torch.randint(0, 37, (16, 12), generator=torch.Generator().manual_seed(3))
    report = {}
    for model, layout in cases:
        how, names = LAYOUTS[layout]
        mesh = make_mesh((2, fx.distributed.world_size() // 2), names) if names else None
        path = f"{folder}/{model}"
        cls = getattr(transformers, json.load(open(f"{path}/config.json"))["architectures"][0])
        tx = fx.optim.adamw(1e-2, weight_decay=0.1)
        whole = fx.shard(fx.TrainState.create(cls.from_pretrained(path), tx, seed=4), mesh,
                         **how)
        loaded = fx.from_pretrained(path, tx, mesh=mesh, seed=4, **how)
        same = {part: _same(getattr(whole, part), getattr(loaded, part))
                for part in ("params", "buffers", "opt_state", "step", "rng")}
        layout_same = [whole.layout.tied == loaded.layout.tied,
                       whole.layout.units == loaded.layout.units,
                       whole.layout.planned == loaded.layout.planned,
                       whole.layout.roles == loaded.layout.roles]
        facts = {"units": list(loaded.layout.units), "planned": list(loaded.layout.planned),
                 "sharded": sum(hasattr(p, "to_local") for p in loaded.params.values())}
        step = fx.make_train_step(_loss)  # eager, donating: whole and loaded are given up
        losses = []
        for state in (whole, loaded):
            data = fx.data.Batches(ids, 4 // fx.distributed.data_world_size(state), seed=0)
            seen = []
            record = fx.callbacks.lambda_callback(
                on_step_end=lambda s, e: seen.append(float(e.metrics["loss"])))
            final = fx.fit(state, step, data, max_steps=steps, callbacks=[record],
                           sync_every=1, progress=False)
            losses.append((seen, final))
        report[f"{model}/{layout}"] = {
            "loaded": same, "layout": layout_same, "losses": [losses[0][0], losses[1][0]],
            "trained": _same(losses[0][1].params, losses[1][1].params)
            and _same(losses[0][1].opt_state, losses[1][1].opt_state), **facts}
    with open(f"{out}/rank{fx.distributed.rank()}.json", "w") as f:
        json.dump(report, f)


def damaged_on_one_rank(out, folder):
    """Rank 1 alone sees a folder cut short (its own copy); every rank must raise, naming
    it, instead of waiting for rank 1 in a collective."""
    import shutil
    rank = fx.distributed.rank()
    path = f"{out}/copy{rank}"
    shutil.copytree(f"{folder}/llama", path)
    if rank == 1:
        file = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
        with open(f"{path}/{file}", "r+b") as f:
            f.truncate(os.path.getsize(f"{path}/{file}") - 1)
    try:
        fx.from_pretrained(path, fx.optim.sgd(0.1))
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"error": error}, f)


def trained_and_saved(out, folder, ckpt):
    """The tied Llama loaded per block, trained 3 steps, saved as a sharded checkpoint; writes
    the digest of its whole parameters."""
    ids = torch.randint(0, 37, (16, 12), generator=torch.Generator().manual_seed(3))
    state = fx.from_pretrained(f"{folder}/llama_tied", fx.optim.adamw(1e-2))
    state = fx.fit(state, fx.make_train_step(_loss), fx.data.Batches(ids, 2, seed=0),
                   max_steps=3, progress=False)
    fx.checkpoint.save(ckpt, state)
    digest = fx.tree_digest(fx.sharding.gathered(state.params))
    with open(f"{out}/rank{fx.distributed.rank()}.json", "w") as f:
        json.dump({"digest": digest}, f)


def loaded_digest(out, folder, layout):
    """``folder`` loaded in ``layout``: the digest of its whole parameters."""
    how, names = LAYOUTS[layout]
    from fxtrain.sharding import mesh as make_mesh
    mesh = make_mesh((2, fx.distributed.world_size() // 2), names) if names else None
    state = fx.from_pretrained(folder, fx.optim.adamw(1e-2), mesh=mesh, **how)
    with open(f"{out}/rank{fx.distributed.rank()}.json", "w") as f:
        json.dump({"digest": fx.tree_digest(fx.sharding.gathered(state.params)),
                   "planned": list(state.layout.planned)}, f)
