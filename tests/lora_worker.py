"""The ranks' side of tests/ranks/test_lora_ranks.py: a Llama loaded by fx.from_pretrained with
a peft LoraConfig over the ranks' layouts, trained on the ranks against one process at the
global batch."""

import torch

import fxtrain as fx


def _lora_config():
    import peft
    # o_proj: a rowwise layer, its lora_A split under a plan, lora_B whole
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0)


def _llama_loss(s, p, ids):
    logits = s.apply(p, ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def _ids(i):
    return torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(i))


def lora_layouts(out, folder, cases, steps=4):
    """Each case (a name of ``pretrained_worker.LAYOUTS``, compiled or not): the Llama in
    ``folder`` loaded with LoRA over the ranks, ``steps`` steps on the global batch's share;
    rank 0 saves the adapter (fx.save_adapter) and records, per case, the losses, the whole
    adapters and base, each frozen tensor's local and whole sizes, and the optimizer state's
    names."""
    from pretrained_worker import LAYOUTS
    rank, world = fx.distributed.rank(), fx.distributed.world_size()
    report = {}
    for layout, compiled in cases:
        kwargs, names = LAYOUTS[layout]
        mesh = fx.sharding.mesh((2, world // 2), names) if names else None
        state = fx.from_pretrained(folder, fx.optim.adamw(3e-2), lora=_lora_config(),
                                   mesh=mesh, **kwargs)
        step = fx.make_train_step(_llama_loss)
        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        frozen = [k for k in state.layout.frozen if k in state.buffers]
        local = {k: getattr(state.buffers[k], "to_local", lambda k=k: state.buffers[k])().numel()
                 for k in frozen}
        total = {k: state.buffers[k].numel() for k in frozen}
        share = fx.distributed.data_world_size(state)
        losses = []
        for i in range(steps):
            state, m = step(state, _ids(i).chunk(share)[fx.distributed.data_rank(state)])
            losses.append(float(m["loss"]))
        key = f"{layout}-{'compiled' if compiled else 'eager'}"
        fx.save_adapter(state, f"{out}/{key}")
        whole = fx.sharding.gathered({**state.params, **{k: state.buffers[k] for k in frozen}})
        report[key] = {"losses": losses, "whole": whole, "local": local, "total": total,
                       "opt": sorted(state.opt_state[0].mu), "params": sorted(state.params)}
    if rank == 0:
        torch.save(report, f"{out}/report{world}.pt")
