"""The ranks' side of tests/ranks/test_offload_ranks.py: a sharded state trained with its
optimizer state offloaded to the host (``fx.shard(offload="optimizer")``) against the same
state without it, bit for bit, on every rank, and their checkpoints across the two."""

import json

import torch

import fxtrain as fx
from helpers import TRACED
from pretrained_worker import LAYOUTS, _local, _loss, _same

STEPS = 10


def _txs():
    """An elementwise AdamW (eager: torch.optim's fused foreach path on the local shards) and
    a chain with global-norm clipping (a reduction over the ranks: DTensor's own ops)."""
    return {"adamw": fx.optim.adamw(1e-2, weight_decay=0.1),
            "clipped": fx.optim.chain(fx.optim.clip_by_global_norm(0.05),
                                      fx.optim.adamw(1e-2, weight_decay=0.1))}


def _data(state):
    ids = torch.randint(0, 37, (16, 12), generator=torch.Generator().manual_seed(3))
    return fx.data.Batches(ids, 4 // fx.distributed.data_world_size(state), seed=0)


def _trained(state, step, steps):
    data = _data(state)
    seen = []
    record = fx.callbacks.lambda_callback(
        on_step_end=lambda s, e: seen.append(float(e.metrics["loss"])))
    final = fx.fit(state, step, data, max_steps=steps, callbacks=[record], sync_every=1,
                   progress=False)
    return final, seen


def _on_host(opt_state):
    """Where each optimizer leaf's data lives, and the bytes held on the host."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(opt_state)
              if isinstance(x, torch.Tensor)]
    devices = sorted({str(_local(x).device) for x in leaves})
    host = sum(_local(x).untyped_storage().nbytes() for x in leaves
               if _local(x).device.type == "cpu")
    return devices, host


def compared(out, folder, cases, ckpt):
    """For each ``(model, layout, tx, compiled)`` of ``cases``: ``STEPS`` steps of the model
    loaded by ``fx.from_pretrained`` with and without ``offload="optimizer"``; then the
    offloaded run saved at step 5, restored into an offloaded and into a plain state, and
    trained to ``STEPS``. Writes ``out/rank<r>.json``."""
    from fxtrain.sharding import mesh as make_mesh
    report = {}
    for model, layout, tx_name, compiled in cases:
        how, names = LAYOUTS[layout]
        mesh = make_mesh((2, fx.distributed.world_size() // 2), names) if names else None
        tx = _txs()[tx_name]

        def load(offload):
            return fx.from_pretrained(f"{folder}/{model}", tx, mesh=mesh, seed=4,
                                      offload=offload, **how)

        def step_fn():
            step = fx.make_train_step(_loss)
            return torch.compile(step, fullgraph=True, backend=TRACED) if compiled else step

        plain, offloaded = load(None), load("optimizer")
        devices, host = _on_host(offloaded.opt_state)
        params_bytes = sum(_local(p).untyped_storage().nbytes()
                           for p in offloaded.params.values())
        start_same = _same(plain.opt_state, offloaded.opt_state) and _same(
            plain.params, offloaded.params)
        a, a_losses = _trained(plain, step_fn(), STEPS)
        b, b_losses = _trained(offloaded, step_fn(), STEPS)
        key = f"{model}/{layout}/{tx_name}/{'compiled' if compiled else 'eager'}"
        got = {"start": start_same, "losses": [a_losses, b_losses],
               "params": _same(a.params, b.params), "opt_state": _same(a.opt_state, b.opt_state),
               "layout": [a.layout.offload, b.layout.offload],
               "devices": devices, "host_bytes": host, "params_bytes": params_bytes,
               "trained_devices": _on_host(b.opt_state)[0]}
        half, _ = _trained(load("optimizer"), step_fn(), STEPS // 2)
        path = f"{ckpt}/{key.replace('/', '_')}"
        fx.checkpoint.save(path, half)
        resumed = {}
        for like in ("optimizer", None):
            like_state = load(like)
            back = fx.checkpoint.restore(
                path, like=like_state.replace(data=_data(like_state).init()))
            placed = [back.layout.offload == like, _on_host(back.opt_state)[0]]
            final, _ = _trained(back, step_fn(), STEPS)  # back given up (donated)
            resumed[str(like)] = [*placed, _same(final.params, b.params)
                                  and _same(final.opt_state, b.opt_state)]
        got["resumed"] = resumed
        report[key] = got
    with open(f"{out}/rank{fx.distributed.rank()}.json", "w") as f:
        json.dump(report, f)


def loaded_bytes(out, folder):
    """What this rank holds after ``fx.from_pretrained`` loads ``folder`` (benchmarks/
    simulate_load.py's sparse folder, its zeros read for real), with and without the
    optimizer offloaded: the bytes by part, as the simulation counts them."""
    from simulate_load import held  # benchmarks/ on the path: the test puts it there
    rows = []
    for offload in (None, "optimizer"):
        state = fx.from_pretrained(folder, fx.optim.adamw(3e-4, weight_decay=0.1),
                                   offload=offload)
        rows.append({**held(state), "offload": offload,
                     "largest_slice": max(_local(p).nbytes for p in state.params.values())})
    with open(f"{out}/rank{fx.distributed.rank()}.json", "w") as f:
        json.dump(rows, f)
