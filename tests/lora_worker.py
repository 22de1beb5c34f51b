"""The ranks' side of tests/ranks/test_lora_ranks.py: a Llama loaded by fx.from_pretrained with
a peft LoraConfig over the ranks' layouts, and a small model whose frozen layer a
tensor-parallel plan splits, trained on the ranks against one process at the global batch."""

import torch

import fxtrain as fx


def _loss(s, p, x):
    return s.apply(p, x).square().mean()


def _lora_config():
    import peft
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0)


def _llama_loss(s, p, ids):
    logits = s.apply(p, ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def _ids(i):
    return torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(i))


def frozen_planned(out, compiled, mesh_shape=None):
    """A model whose frozen first layer a tensor-parallel plan splits (colwise, then the
    trained second layer rowwise), on a 1-D mesh or FSDP x TP on a 2-D one."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    rank, world = fx.distributed.rank(), fx.distributed.world_size()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    m[0].requires_grad_(False)
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    mesh = None if mesh_shape is None else fx.sharding.mesh(mesh_shape, ("dp", "tp"))
    state = fx.shard(fx.TrainState.create(m, fx.optim.adamw(1e-2)), mesh, tp_plan=plan)
    step = fx.make_train_step(_loss)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    data = fx.distributed.data_world_size(state)
    local = {k: b.to_local().numel() for k, b in state.buffers.items()}
    losses = []
    for i in range(4):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(i))
        state, m_ = step(state, x.chunk(data)[fx.distributed.data_rank(state)])
        losses.append(float(m_["loss"]))
    whole = fx.sharding.gathered({**state.params, **state.buffers})
    if rank == 0:
        torch.save({"losses": losses, "whole": whole, "local": local}, f"{out}/planned.pt")


def frozen_planned_one(out):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    m[0].requires_grad_(False)
    state = fx.TrainState.create(m, fx.optim.adamw(1e-2))
    step = fx.make_train_step(_loss)
    losses = []
    for i in range(4):
        state, m_ = step(state, torch.randn(8, 8, generator=torch.Generator().manual_seed(i)))
        losses.append(float(m_["loss"]))
    torch.save({"losses": losses, "whole": {**state.params, **state.buffers}},
               f"{out}/planned_one.pt")


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
