"""The ranks' side of tests/ranks/test_context_parallel_ranks.py: context parallelism's ring
attention and its steps, on gloo ranks, against one process."""

import torch
import torch.nn.functional as F

import fxtrain as fx
from fxtrain._torch.context_parallel import ring_attention
from fxtrain.distributed._context import slots


def _qkv(heads=4, kv_heads=4, length=32, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, length, dim, generator=g),
            torch.randn(2, kv_heads, length, dim, generator=g),
            torch.randn(2, kv_heads, length, dim, generator=g))


def rings_against_sdpa(out, cases):
    """``ring_against_sdpa`` for each ``(compiled, kv_heads)`` of ``cases``."""
    for compiled, kv_heads in cases:
        ring_against_sdpa(out, compiled, kv_heads)


def ring_against_sdpa(out, compiled=False, kv_heads=4):
    """Each rank's slice of causal SDPA over the whole sequence, and the whole inputs'
    gradients summed over the ranks' slices, through ``ring_attention``; rank 0 saves them with
    one process's."""
    rank, world = fx.distributed.rank(), fx.distributed.world_size()
    q, k, v = _qkv(kv_heads=kv_heads)
    index = slots(q.shape[2], world, rank)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(q.shape, generator=g)  # the loss's gradient of the output

    def whole(q, k, v):  # one process: transformers' repeat of the keys for GQA, then SDPA
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ring(q, k, v):  # grouped-query keys and values around the ring as they are
        return ring_attention(q, k, v, torch.distributed.group.WORLD)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = whole(*leaves)
    (expected * upstream).sum().backward()
    mine = [t[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    fn = torch.compile(ring, fullgraph=True, backend="aot_eager") if compiled else ring
    got = fn(*mine)
    (got * upstream[:, :, index]).sum().backward()
    grads = []
    for t, whole_grad in zip(mine, leaves):
        full = torch.zeros_like(whole_grad)
        full[:, :, index] = t.grad
        torch.distributed.all_reduce(full)
        grads.append(full)
    outs = [torch.zeros_like(expected) for _ in range(world)]
    torch.distributed.all_gather(outs, torch.zeros_like(expected).index_copy(
        2, index, got.detach()))
    if rank == 0:
        torch.save({"expected": expected.detach(), "got": sum(outs),
                    "grads": grads, "expected_grads": [t.grad for t in leaves]},
                   f"{out}/ring{world}-{'compiled' if compiled else 'eager'}-{kv_heads}.pt")


def _llama(dropout=0.0):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _gpt2(dropout=0.0):
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=24,
                                     n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=0.0, use_cache=False)
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": _llama, "gpt2": _gpt2}


def batches(steps=10, rows=4, length=32, packed=False):
    """``steps`` batches of ``rows`` sequences of ``length`` tokens (labels the tokens); packed:
    each row three documents (``position_ids`` restarting at each, the label of each document's
    first token -100, as transformers' ``DataCollatorWithFlattening`` makes them)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 24, (rows, length), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if packed:
            positions = torch.empty_like(ids)
            for row in range(rows):
                cuts = sorted(torch.randperm(length - 1, generator=g)[:2].add(1).tolist())
                for start, end in zip([0, *cuts], [*cuts, length]):
                    positions[row, start:end] = torch.arange(end - start)
                    batch["labels"][row, start] = -100
            batch["position_ids"] = positions
        out.append(batch)
    return out


def whole_loss(s, p, batch):
    """One process: transformers' shift of the labels inside the loss; packed documents'
    masks made by transformers from their positions."""
    logits = s.apply(p, input_ids=batch["input_ids"],
                     position_ids=batch.get("position_ids")).logits
    return fx.losses.causal_lm(logits, batch["labels"])


def context_loss(s, p, batch):
    """A context-parallel rank: the labels shifted on the whole sequence (``shift_labels``),
    the positions of its slice, and packed documents' ``document_mask`` passed to the model."""
    if "shift_labels" not in batch:
        return whole_loss(s, p, batch)
    extra = {"document_mask": batch["document_mask"]} if "document_mask" in batch else {}
    logits = s.apply(p, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     **extra).logits
    return fx.losses.causal_lm(logits, batch["shift_labels"], shift=False)


def trained(state, step, data):
    """A step on this rank's data share of each batch of ``data``; the losses."""
    share, at = fx.distributed.data_world_size(state), fx.distributed.data_rank(state)
    losses = []
    for batch in data:
        state, metrics = step(state, {k: v.chunk(share)[at] for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return state, losses


def context_steps(out, model="llama", modes=("eager",), shape=(2,), names=("cp",),
                  tp_plan=None, dropout=0.0, steps=10, packed=False, name="steps", length=32):
    """``model`` trained ``steps`` steps on a mesh with a context dimension ``"cp"``, once per
    mode (``"eager"``, ``"compiled"``, ``"checkpointed"``: eager with transformers' gradient
    checkpointing, non-reentrant, on every layer); rank 0 saves each run's losses, whole
    parameters, graph count, calls of the ring and the layout's printed form to
    ``out/<name>.pt``."""
    from helpers import TRACED
    from fxtrain._torch import context_parallel
    mesh = fx.sharding.mesh(shape, names)
    # the ring run by the op's kernel: a checkpoint's recompute served from a cache calls the
    # attention function in Python but runs no ring
    report, ring, calls = {}, context_parallel._ring_forward_composite, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return ring(*args, **kwargs)

    for mode in modes:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        module = MODELS[model](dropout)
        if mode == "checkpointed":
            module.gradient_checkpointing_enable({"use_reentrant": False})
        state = fx.shard(fx.TrainState.create(module, fx.optim.adamw(1e-2)),
                         mesh, context="cp", tp_plan=tp_plan)
        step = fx.make_train_step(context_loss)
        if mode == "compiled":
            step = torch.compile(step, fullgraph=True, backend=TRACED)
        calls[0] = 0
        if mode != "compiled":  # a counter traced would be a constant Dynamo guards on
            context_parallel._ring_forward_composite = counted
        try:
            state, losses = trained(state, step, batches(steps, length=length, packed=packed))
        finally:
            context_parallel._ring_forward_composite = ring
        report[mode] = {"losses": losses, "eval": evaluated(state, length, packed),
                        "params": fx.sharding.gathered(state.params),
                        "layout": repr(state.layout), "ring_calls": calls[0],
                        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    if fx.distributed.rank() == 0:
        torch.save(report, f"{out}/{name}.pt")


def evaluated(state, length=32, packed=False):
    """``fx.evaluate``'s loss on this rank's data share of two held-out batches (a sharded
    state's: its whole parameters on the model as it was, whole sequences)."""
    share = fx.distributed.data_world_size(state) if state.layout.sharded else 1
    at = fx.distributed.data_rank(state) if state.layout.sharded else 0
    held_out = batches(12, length=length, packed=packed)[10:]
    data = [{k: v.chunk(share)[at] for k, v in b.items()} for b in held_out]
    return float(fx.evaluate(fx.make_eval_step(context_loss), state, data)["loss"])


def one_process(model="llama", dropout=0.0, steps=10, packed=False, length=32):
    """The reference: one process, whole sequences, the global batch; its losses, parameters
    and held-out loss."""
    state = fx.TrainState.create(MODELS[model](dropout), fx.optim.adamw(1e-2))
    data = batches(steps, length=length, packed=packed)
    state, losses = trained(state, fx.make_train_step(whole_loss), data)
    return losses, state.params, evaluated(state, length, packed)


def context_resume(out, model="gpt2", dropout=0.1, steps=(5, 5), packed=False,
                   layouts=(((2,), ("cp",), None),)):
    """On the first of ``layouts`` (each a mesh's shape and names, a context dimension "cp"
    among them, and a tensor-parallel plan): ``steps[0]`` steps, a checkpoint, ``steps[1]``
    more; then a fresh state on each layout restored from the checkpoint runs the same
    ``steps[1]``. Rank 0 saves the uninterrupted run's losses, and each run's digest, whole
    parameters and printed layout (the checkpoint stays at ``out/c`` for one process)."""

    def made(shape, names, plan):
        return fx.shard(fx.TrainState.create(MODELS[model](dropout), fx.optim.adamw(1e-2)),
                        fx.sharding.mesh(shape, names), context="cp", tp_plan=plan)

    step = fx.make_train_step(context_loss)
    data = batches(sum(steps), packed=packed)
    state, first = trained(made(*layouts[0]), step, data[:steps[0]])
    fx.checkpoint.save(f"{out}/c", state)
    state, second = trained(state, step, data[steps[0]:])
    runs = [state]
    for layout in layouts:
        back = fx.checkpoint.restore(f"{out}/c", like=made(*layout))
        runs.append(trained(back, step, data[steps[0]:])[0])
    report = {"losses": first + second,
              "runs": [{"digest": fx.tree_digest(s.replace(data=None)),
                        "params": fx.sharding.gathered(s.params), "layout": repr(s.layout)}
                       for s in runs]}
    if fx.distributed.rank() == 0:
        torch.save(report, f"{out}/resume.pt")


EIGHT = ((2, 2, 2), ("dp", "cp", "tp"), "auto")  # FSDP x CP x TP
"""2 x 2 x 2: the parameters sharded over dp x cp, split by transformers' plan over tp."""


def eight_ranks(out):
    """Issue 79's runs on 8 ranks: Llama on packed documents on 2 x 2 x 2, eager with a
    checkpoint restored onto 2 x 2 x 2 and onto 4 x 2 x 1 (dp, cp), and compiled; GPT-2 (no
    tensor-parallel plan in transformers) with dropout through the ring of all 8 ranks (data
    ranks draw masks of their own, as data parallelism does, so dropout is compared with one
    process on context ranks only), sequences of 64 tokens in 16 chunks of 4; Llama through the
    ring on HSDP x CP, 2 x 2 x 2 (replicate, shard, cp)."""
    context_resume(out, "llama", 0.0, packed=True,
                   layouts=(EIGHT, ((4, 2), ("dp", "cp"), None)))
    context_steps(out, "llama", ("compiled",), *EIGHT, packed=True, name="llama")
    context_steps(out, "gpt2", ("eager",), (8,), ("cp",), dropout=0.1, name="gpt2", length=64)
    context_steps(out, "llama", ("eager",), (2, 2, 2), ("replicate", "shard", "cp"),
                  name="hsdp")
