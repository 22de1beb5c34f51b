"""The lever left for a first step whose compile time is flat in depth (issue 62), measured
outside fxtrain: one training step of a GPT-2-shaped model (width 64, 2 heads, vocabulary 256,
batch 8 x 64 tokens, no dropout) in pure torch, forward, backward by ``torch.autograd.grad`` and
an AdamW update in one ``torch.compile(fullgraph=True)`` graph, its blocks

  unrolled  each layer's 12 parameters separate tensors, a Python loop over the layers (how a
            state holds and a step runs them without ``fx.regional``: Dynamo, AOTAutograd and
            Inductor see every layer, and the update every layer's tensors);
  regions   the same, each layer a call of one ``torch.compiler.nested_compile_region`` (the
            block traced and compiled once; the update still every layer's tensors);
  updates   ``regions`` with each layer's update a call of a second region too (traced and
            compiled once, called per layer): how ``fx.regional`` runs a step today, two
            region calls per layer;
  stacked   each parameter name one tensor of [layers, ...], ``unbind`` into the layers, each a
            call of the region (the Python loop a model's forward has), the update over 16
            tensors whatever the depth: what a state stacked per block kind would give a model
            whose forward calls its blocks one by one;
  scan      the stacked tensors, the layers run by torch's ``scan``
            (``torch._higher_order_ops.scan``: the block traced once, its backward a scan too):
            one call whatever the depth, which needs the loop over the blocks to be the scan.
  fxtrain   the model as an ``nn.Module`` (``gpt``: its blocks modules of one class), in a
            ``fx.TrainState`` with ``fx.optim.adamw`` of the same hyperparameters, under
            ``fx.regional`` and fxtrain's train step: what ``updates`` does by hand, as fxtrain
            does it (how much fxtrain adds per layer to torch's own cost of the design).

The pure-torch region variants run as ``fx.regional`` runs: ``materialize_grads=True`` (a reused
region's outputs have no autograd history while Dynamo traces) and Inductor's buffer reuse off
(``fxtrain._torch.inductor.keep_region_outputs``: with it on, the 24-layer step here trained
other values and then aborted with "corrupted double-linked list").

Each variant and depth runs in a fresh process with an empty Inductor cache and reports the
first step's CPU seconds (the process and its compile workers) and wall seconds, a steady
step's milliseconds (the median of 5, one thread), its loss and the eager step's (the same
model: the variants' losses agree to float32 rounding).

Run: python benchmarks/scan_depth.py [--layers 2 24] [--variants unrolled regions updates
     stacked scan fxtrain] [--smoke]
     (--smoke: one layer, compiled with aot_eager: the script works, no timing worth reading)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import backend, in_fresh_process, use_smoke_backend
from compile_time import process_tree_cpu

D, HEADS, V, T, B = 64, 2, 256, 64, 8
NAMES = ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b", "ln2_w", "ln2_b",
         "fc_w", "fc_b", "fc2_w", "fc2_b")


VARIANTS = ("unrolled", "regions", "updates", "stacked", "scan", "fxtrain")
STACKED = ("stacked", "scan")
REGIONS = ("regions", "updates", "stacked")


def shapes():
    return {"ln1_w": (D,), "ln1_b": (D,), "attn_w": (D, 3 * D), "attn_b": (3 * D,),
            "proj_w": (D, D), "proj_b": (D,), "ln2_w": (D,), "ln2_b": (D,),
            "fc_w": (D, 4 * D), "fc_b": (4 * D,), "fc2_w": (4 * D, D), "fc2_b": (D,)}


def block(x, p):
    import torch
    import torch.nn.functional as F

    h = F.layer_norm(x, (D,), p["ln1_w"], p["ln1_b"])
    q, k, v = (h @ p["attn_w"] + p["attn_b"]).split(D, dim=-1)
    q, k, v = (t.view(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + a.transpose(1, 2).reshape(B, T, D) @ p["proj_w"] + p["proj_b"]
    h = F.layer_norm(x, (D,), p["ln2_w"], p["ln2_b"])
    return x + F.gelu(h @ p["fc_w"] + p["fc_b"]) @ p["fc2_w"] + p["fc2_b"]


def init(layers, stacked):
    import torch

    g = torch.Generator().manual_seed(0)
    per_layer = [{n: (torch.ones(s) if n.startswith("ln") and n.endswith("_w") else
                      torch.randn(s, generator=g) * 0.02) for n, s in shapes().items()}
                 for _ in range(layers)]
    params = {"wte": torch.randn(V, D, generator=g) * 0.02,
              "wpe": torch.randn(T, D, generator=g) * 0.01,
              "lnf_w": torch.ones(D), "lnf_b": torch.zeros(D)}
    if stacked:
        params.update({n: torch.stack([p[n] for p in per_layer]) for n in NAMES})
    else:
        params.update({f"h{i}.{n}": t for i, p in enumerate(per_layer) for n, t in p.items()})
    return params


B1, B2, LR, WD, EPS = 0.9, 0.95, 1e-3, 1e-2, 1e-8


def adamw(params, m, v, grads, c1, c2):
    """AdamW's update of the tensors of ``params`` (a dict), with their moments and gradients
    (dicts of the same keys): the new parameters, first and second moments."""
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        new_m[k] = B1 * m[k] + (1 - B1) * g
        new_v[k] = B2 * v[k] + (1 - B2) * g * g
        new_p[k] = p - LR * WD * p - LR * (new_m[k] / c1) / ((new_v[k] / c2).sqrt() + EPS)
    return new_p, new_m, new_v


def make_step(layers, variant):
    import torch
    import torch.nn.functional as F
    from torch._higher_order_ops.scan import scan

    region = torch.compiler.nested_compile_region(block)
    update_region = torch.compiler.nested_compile_region(adamw)

    def forward(params, tokens):
        x = params["wte"][tokens] + params["wpe"]
        if variant == "scan":
            x, _ = scan(lambda c, p: (block(c, p), c.new_zeros(())), x,
                        {n: params[n] for n in NAMES})
        elif variant == "stacked":
            rows = {n: params[n].unbind(0) for n in NAMES}
            for i in range(layers):
                x = region(x, {n: rows[n][i] for n in NAMES})
        else:
            run = block if variant == "unrolled" else region
            for i in range(layers):
                x = run(x, {n: params[f"h{i}.{n}"] for n in NAMES})
        x = F.layer_norm(x, (D,), params["lnf_w"], params["lnf_b"])
        logits = x @ params["wte"].t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))

    def step(params, m, v, t, tokens):
        leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
        with torch.enable_grad():
            loss = forward(leaves, tokens)
            grads = dict(zip(leaves, torch.autograd.grad(  # see the module on regions
                loss, list(leaves.values()), materialize_grads=variant in REGIONS)))
        t = t + 1
        c1, c2 = 1 - B1 ** t, 1 - B2 ** t
        if variant != "updates":
            return (*adamw(params, m, v, grads, c1, c2), t, loss.detach())
        new = [{}, {}, {}]  # each layer's tensors a call of the update's region, then the rest
        groups = [([f"h{i}.{n}" for n in NAMES], update_region) for i in range(layers)]
        groups.append(([k for k in params if "." not in k], adamw))  # embeddings, last norm
        for names, update in groups:
            out = update(*({k: d[k] for k in names} for d in (params, m, v, grads)), c1, c2)
            for whole, part in zip(new, out):
                whole.update(part)
        return *({k: d[k] for k in params} for d in new), t, loss.detach()  # params' order

    return step


def gpt(layers):
    """The model of ``init(layers, False)`` as an ``nn.Module`` whose blocks are modules of one
    class (their forward ``block``), for ``fx.regional``."""
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self, tensors):
            super().__init__()
            for name, t in tensors.items():
                self.register_parameter(name, torch.nn.Parameter(t))

        def forward(self, x):
            return block(x, {n: getattr(self, n) for n in NAMES})

    class GPT(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                Block({n: params[f"h{i}.{n}"] for n in NAMES}) for i in range(layers))
            for name in ("wte", "wpe", "lnf_w", "lnf_b"):
                self.register_parameter(name, torch.nn.Parameter(params[name]))

        def forward(self, tokens):
            x = self.wte[tokens] + self.wpe
            for b in self.blocks:
                x = b(x)
            x = F.layer_norm(x, (D,), self.lnf_w, self.lnf_b)
            logits = x @ self.wte.t()
            return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))

    return GPT(init(layers, False)), Block


def pure_torch(variant, layers, tokens):
    """The pure-torch variants: the compiled step as ``carry -> (carry, loss)``, the first
    carry (parameters, moments, count) and the eager step's loss from it."""
    import torch
    import torch._inductor.config

    if variant in REGIONS:  # Inductor reuses a region's output buffer while it is still read
        torch._inductor.config.allow_buffer_reuse = False  # (fxtrain._torch.inductor)
    params = init(layers, variant in STACKED)
    zeros = lambda: {k: torch.zeros_like(p) for k, p in params.items()}  # noqa: E731
    first = (params, zeros(), zeros(), torch.zeros(()))
    step = torch.compile(make_step(layers, variant), fullgraph=True, backend=backend())

    def run(carry):
        *carry, loss = step(*carry, tokens)
        return carry, loss

    # torch's eager scan compiles its body itself, which Dynamo's counters would count: last
    return run, first, lambda: make_step(layers, variant)(*first, tokens)[-1]


def fxtrain_regional(layers, tokens):
    """``fxtrain``: ``gpt``'s model in a ``fx.TrainState`` with fxtrain's AdamW (the same
    hyperparameters; optax's order of the same operations), ``fx.regional`` over its blocks,
    fxtrain's train step: as ``pure_torch``."""
    import torch
    import fxtrain as fx

    model, block_class = gpt(layers)
    tx = fx.optim.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    state = fx.regional(fx.TrainState.create(model, tx), blocks=[block_class])
    loss = lambda s, p, batch: s.apply(p, batch)  # noqa: E731
    step = torch.compile(fx.make_train_step(loss, donate=False), fullgraph=True,
                         backend=backend())

    def run(carry):
        carry, metrics = step(carry, tokens)
        return carry, metrics["loss"]

    return run, state, lambda: fx.make_train_step(loss, donate=False)(state, tokens)[1]["loss"]


def child(variant, layers):
    import torch
    import torch._dynamo.utils

    torch.set_num_threads(1)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    if variant == "fxtrain":
        run, carry, eager = fxtrain_regional(layers, tokens)
    else:
        torch._dynamo.config.trace_autograd_ops = True  # torch.autograd.grad inside the graph
        run, carry, eager = pure_torch(variant, layers, tokens)
    c0, w0 = process_tree_cpu(), time.perf_counter()
    carry, loss = run(carry)
    first_cpu, first_wall = process_tree_cpu() - c0, time.perf_counter() - w0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    carry, loss2 = run(carry)
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] != frames
    times = []
    for _ in range(5):  # steady steps: the median of 5
        w = time.perf_counter()
        carry, _loss = run(carry)
        times.append(time.perf_counter() - w)
    print(json.dumps({"variant": variant, "layers": layers, "first_cpu_s": first_cpu,
                      "first_wall_s": first_wall, "loss": float(loss),
                      "eager_loss": float(eager()), "second_loss": float(loss2),
                      "graphs": frames, "recompiled": recompiled,
                      "step_ms": 1e3 * sorted(times)[2]}))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--layers", nargs="+", type=int, default=[2, 24])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))
    if args.smoke:
        args.layers = [1]
        use_smoke_backend()
    rows, before = [], os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        for layers in args.layers:
            for variant in args.variants:
                with tempfile.TemporaryDirectory() as cache:  # cold: an empty cache each
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                    rows.append(in_fresh_process(__file__, [variant, str(layers)],
                                                 f"{variant} x{layers}"))
                print(rows[-1], flush=True)
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
    by = {(r["variant"], r["layers"]): r for r in rows}
    for variant in args.variants:
        first, last = by[(variant, args.layers[0])], by[(variant, args.layers[-1])]
        cpu = " ".join(f"{by[(variant, n)]['first_cpu_s']:.1f}" for n in args.layers)
        depths = " ".join(map(str, args.layers))
        ratio = last["first_cpu_s"] / first["first_cpu_s"]
        steps = " ".join(f"{by[(variant, n)]['step_ms']:.1f}" for n in args.layers)
        print(f"{variant}: first step {cpu} CPU-s at {depths} layers; "
              f"{args.layers[-1]} / {args.layers[0]} layers {ratio:.2f}x; steady step {steps} ms")
    return rows


if __name__ == "__main__":
    main()
