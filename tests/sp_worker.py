"""The scenarios of sequence and loss parallelism (``tests/ranks/test_sequence_parallel_ranks.py``),
run on each rank through ``dist_worker.spawned``, or alone (world 1) as one process's reference."""

import torch
import torch.nn.functional as F
from torch import nn

import dist_worker
import fxtrain as fx

STEPS = 4


def llama_plan():
    """torchtitan's Llama plan in a transformers Llama's names: the norms on the sequence's
    split (``SequenceParallel``), attention and MLP taking it whole (``PrepareModuleInput``), the
    rowwise layers reduce-scattering back onto it, the head's logits left split along the
    vocabulary (loss parallel). The sequence is split where the first layer starts, after the
    model has made its positions and mask from the whole one. A new plan at each call: torch's
    styles keep state of the module they were applied to."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)
    layer = "model.layers.*."
    return {
        "model.layers.0": PrepareModuleInput(input_layouts=(Replicate(),),
                                             desired_input_layouts=(Shard(1),),
                                             use_local_output=True),
        layer + "input_layernorm": SequenceParallel(),
        layer + "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        **{layer + f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"},
        layer + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        layer + "post_attention_layernorm": SequenceParallel(),
        layer + "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                          desired_input_layouts=(Replicate(),)),
        layer + "mlp.gate_proj": ColwiseParallel(),
        layer + "mlp.up_proj": ColwiseParallel(),
        layer + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        "model.norm": SequenceParallel(use_local_output=True),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                   use_local_output=False),
    }


def lm_loss(state, params, batch):
    return fx.losses.causal_lm(state.apply(params, **batch).logits, batch["input_ids"])


def eval_loss(state, params, ids):
    """``lm_loss`` of ``dist_worker.held_out_batches()``'s batches (token ids)."""
    return fx.losses.causal_lm(state.apply(params, input_ids=ids).logits, ids)


def batches(state=None):
    """One global batch of 4 sequences of 12 tokens ``STEPS`` times (so that the loss falls
    from step to step: a run that trained), each data replica of ``state`` taking its share
    (None: torch's own tensor-parallel model, whose ranks take all of it)."""
    ids = torch.randint(0, 24, (4, 12), generator=torch.Generator().manual_seed(3))
    if state is None:
        return [{"input_ids": ids}] * STEPS
    share = 4 // fx.distributed.data_world_size(state)
    at = fx.distributed.data_rank(state) * share
    return [{"input_ids": ids[at:at + share]}] * STEPS


def trained(make_model, plan, mesh, compiled, ckpt=None):
    """``STEPS`` AdamW steps of ``make_model()``, sharded with ``plan`` on ``mesh`` on several
    ranks: the losses, the whole parameters and the graphs compiled. With ``ckpt`` (a folder),
    beyond the step too: ``resumed``'s continuation from a checkpoint saved halfway, then
    ``dist_worker.evaluated``'s evaluation and prediction of the trained state."""
    from helpers import TRACED, graph_count
    state = sharded(make_model, plan, mesh)
    step = fx.make_train_step(lm_loss)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=TRACED)
    losses, before = [], graph_count()
    for i, batch in enumerate(batches(state), 1):
        state, metrics = step(state, batch, donate=True)  # as fit does: one graph for both
        losses.append(float(metrics["loss"]))
        if ckpt and i == STEPS // 2:
            fx.checkpoint.save(ckpt, state)
    run = {"losses": losses, "params": fx.sharding.gathered(state.params)}
    if ckpt:
        run.update(resumed(make_model, plan, mesh, step, ckpt), digest=digest(state))
    run["graphs"] = graph_count() - before  # the train step's (fit's evaluations run eagerly)
    if ckpt:
        run.update(dist_worker.evaluated(state, fx.make_eval_step(eval_loss), compiled))
    return run


def sharded(make_model, plan, mesh):
    """A fresh state of ``make_model()``, sharded with ``plan`` on ``mesh`` on several ranks."""
    state = fx.TrainState.create(make_model(), fx.optim.adamw(1e-2), seed=5)
    if fx.distributed.world_size() > 1:
        state = fx.shard(state, mesh, tp_plan=plan)
    return state


def resumed(make_model, plan, mesh, step, ckpt):
    """The checkpoint in ``ckpt`` restored into a fresh sharded state (``restore(like=...)``,
    as a restarted job does) and trained to ``STEPS`` by ``fx.fit`` with ``step``, evaluating
    at its end (the first evaluation of the run): its losses, evaluation and digest."""
    like = sharded(make_model, plan, mesh)
    state = fx.checkpoint.restore(ckpt, like=like)
    losses, evals = [], []
    seen = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: losses.append(float(e.metrics["loss"])),
        on_eval_end=lambda s, e: evals.append({k: float(v) for k, v in e.metrics.items()}))
    state = fx.fit(state, step, batches(state)[STEPS // 2:], max_steps=STEPS, callbacks=[seen],
                   sync_every=1, eval_step=fx.make_eval_step(eval_loss),
                   eval_data=dist_worker.held_out_batches(), eval_every=STEPS // 2,
                   progress=False)
    return {"resumed_losses": losses, "resumed_evals": evals,
            "resumed_digest": digest(state)}


def digest(state):
    """``fx.tree_digest`` of what training computes (``fit`` adds its stream's position)."""
    return fx.tree_digest((state.step, state.params, state.buffers, state.opt_state, state.rng))


def with_torch(plan):
    """The same steps with torch's own ``parallelize_module`` and ``loss_parallel`` on the
    module, ``torch.optim.AdamW``: the losses and the whole parameters."""
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
    model = dist_worker.rank_llama()
    parallelize_module(model, fx.sharding.mesh(), plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in batches():
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits
        with loss_parallel():
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach().full_tensor()))
    return {"losses": losses, "params": {n: p.full_tensor().detach() if hasattr(
        p, "full_tensor") else p.detach() for n, p in model.named_parameters()}}


def sequence_parallel(out, layout="tp"):
    """A tiny Llama under ``llama_plan()``: on a 1-D mesh eager, compiled and torch's own, each
    of ours also resumed from a checkpoint, evaluated and predicting (``trained``'s ``ckpt``);
    on a 2 x 2 mesh ("fsdp_tp": sharded over "dp", the plan over "tp") compiled; alone, eager,
    resumed, evaluated and predicting."""
    world = fx.distributed.world_size()
    mesh = fx.sharding.mesh((2, 2), ("dp", "tp")) if layout == "fsdp_tp" else None
    kinds = (False,) if world == 1 else (True,) if layout == "fsdp_tp" else (False, True)
    ckpt = (lambda c: f"{out}/ckpt_{c}") if layout == "tp" else (lambda c: None)
    runs = {("compiled" if c else "eager"): trained(dist_worker.rank_llama, llama_plan(), mesh,
                                                    c, ckpt(c)) for c in kinds}
    if world > 1 and layout == "tp":
        runs["torch"] = with_torch(llama_plan())
    torch.save(runs, f"{out}/{layout}_rank{fx.distributed.rank()}.pt")


def dropped_model():
    """Embedding, norm, dropout, an MLP, dropout, norm, head: the dropouts on activations split
    along the sequence under ``dropout_plan()``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(24, 16), nn.LayerNorm(16), nn.Dropout(0.5),
                         nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Dropout(0.5),
                         nn.LayerNorm(16), nn.Linear(16, 24))


class _Ids(nn.Module):
    """``dropped_model()`` called as a language model: ``input_ids`` in, ``.logits`` out."""

    def __init__(self):
        super().__init__()
        self.net = dropped_model()

    def forward(self, input_ids):
        return _Out(self.net(input_ids))


class _Out:
    def __init__(self, logits):
        self.logits = logits


def dropout_plan():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel)
    return {"net.0": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "net.1": SequenceParallel(), "net.2": SequenceParallel(),
            "net.3": ColwiseParallel(input_layouts=Shard(1)),
            "net.5": RowwiseParallel(output_layouts=Shard(1)),
            "net.6": SequenceParallel(), "net.7": SequenceParallel(),
            "net.8": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                     use_local_output=False)}


def sequence_dropout(out):
    """Keyed dropout on activations split along the sequence: ``F.dropout`` of a ``Shard(1)``
    DTensor against one process's on the whole tensor, and ``dropped_model()`` trained under
    ``dropout_plan()`` (eager and compiled; alone, eager)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    key = fx.random.seed_key(7)
    with fx.random.keyed(key):
        whole = F.dropout(x, 0.5)
    runs = {"whole": whole}
    if fx.distributed.world_size() > 1:
        with fx.random.keyed(key):
            runs["part"] = F.dropout(distribute_tensor(x, fx.sharding.mesh(), [Shard(1)]),
                                     0.5).to_local()
    for compiled in (False, True) if fx.distributed.world_size() > 1 else (False,):
        runs["compiled" if compiled else "eager"] = trained(_Ids, dropout_plan(), None,
                                                            compiled)
    torch.save(runs, f"{out}/dropout_rank{fx.distributed.rank()}.pt")


def refused(out):
    """Plans and batches a sequence-parallel job cannot take, each refused on every rank with
    one ``ValueError`` naming the problem (issue 75, hole 5), compiled and eager: the error
    messages, or what happened instead."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel)
    import dist_worker

    def outcome(make):
        try:
            make()
        except ValueError as error:
            return str(error)
        return "ran"

    odd = {"input_ids": torch.randint(0, 24, (2, 11), generator=torch.Generator().manual_seed(3))}
    found = {}
    for compiled in (False, True):
        def odd_sequence():
            step = fx.make_train_step(lm_loss)
            if compiled:
                step = torch.compile(step, fullgraph=True, backend="aot_eager")
            fx.fit(sharded(dist_worker.rank_llama, llama_plan(), None), step, [odd],
                   max_steps=1, progress=False)
        found[f"odd_sequence_{'compiled' if compiled else 'eager'}"] = outcome(odd_sequence)
    found["gpt2_ln_1"] = outcome(lambda: fx.shard(fx.TrainState.create(
        dist_worker.tiny_gpt2(), fx.optim.adamw(1e-2)), tp_plan={
            "transformer.h.*.ln_1": SequenceParallel()}))
    no_start = {k: v for k, v in llama_plan().items() if k != "model.layers.0"}
    no_start.pop("lm_head")
    found["llama_norms_alone"] = outcome(lambda: fx.shard(fx.TrainState.create(
        dist_worker.rank_llama(), fx.optim.adamw(1e-2)), tp_plan={
            k: v for k, v in no_start.items() if "proj" not in k}))

    def flat_norm():
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        plan = {"0": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),
                "1": SequenceParallel(), "2": ColwiseParallel(input_layouts=Shard(1))}
        state = fx.shard(fx.TrainState.create(model, fx.optim.sgd(0.1)), tp_plan=plan)
        step = fx.make_train_step(lambda s, p, b: s.apply(p, b).square().mean())
        step(state, torch.randn(4, 8))
    found["norm_without_a_sequence"] = outcome(flat_norm)
    torch.save(found, f"{out}/refused_rank{fx.distributed.rank()}.pt")
