"""The lever left for a first step whose compile time is flat in depth (issue 62), measured
outside fxtrain: one training step of a GPT-2-shaped model (width 64, 2 heads, vocabulary 256,
batch 8 x 64 tokens, no dropout) in pure torch, forward, backward by ``torch.autograd.grad`` and
an AdamW update in one ``torch.compile(fullgraph=True)`` graph, its blocks

  unrolled  each layer's 12 parameters separate tensors, a Python loop over the layers (how a
            state holds and a step runs them without ``fx.regional``: Dynamo, AOTAutograd and
            Inductor see every layer, and the update every layer's tensors);
  regions   the same, each layer a call of one ``torch.compiler.nested_compile_region`` (the
            block traced and compiled once; the update still every layer's tensors);
  stacked   each parameter name one tensor of [layers, ...], ``unbind`` into the layers, each a
            call of the region (the Python loop a model's forward has), the update over 16
            tensors whatever the depth: what a state stacked per block kind would give a model
            whose forward calls its blocks one by one;
  scan      the stacked tensors, the layers run by torch's ``scan``
            (``torch._higher_order_ops.scan``: the block traced once, its backward a scan too):
            one call whatever the depth, which needs the loop over the blocks to be the scan.

The region variants run as ``fx.regional`` runs: ``materialize_grads=True`` (a reused region's
outputs have no autograd history while Dynamo traces) and Inductor's buffer reuse off
(``fxtrain._torch.inductor.keep_region_outputs``: with it on, the 24-layer step here trained
other values and then aborted with "corrupted double-linked list").

Each variant and depth runs in a fresh process with an empty Inductor cache and reports the
first step's CPU seconds (the process and its compile workers) and wall seconds, a steady
step's milliseconds (the median of 5, one thread), its loss and the eager step's (the same
model: the variants' losses agree to float32 rounding).

Run: python benchmarks/scan_depth.py [--layers 2 24] [--variants unrolled regions stacked scan]
     [--smoke]
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


VARIANTS = ("unrolled", "regions", "stacked", "scan")
STACKED = ("stacked", "scan")
REGIONS = ("regions", "stacked")


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


def make_step(layers, variant):
    import torch
    import torch.nn.functional as F
    from torch._higher_order_ops.scan import scan

    region = torch.compiler.nested_compile_region(block)

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
            run = region if variant == "regions" else block
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
        b1, b2, lr, wd, eps = 0.9, 0.95, 1e-3, 1e-2, 1e-8
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new_p, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            new_m[k] = b1 * m[k] + (1 - b1) * g
            new_v[k] = b2 * v[k] + (1 - b2) * g * g
            new_p[k] = p - lr * wd * p - lr * (new_m[k] / c1) / ((new_v[k] / c2).sqrt() + eps)
        return new_p, new_m, new_v, t, loss.detach()

    return step


def child(variant, layers):
    import torch
    import torch._dynamo.utils
    import torch._inductor.config

    torch.set_num_threads(1)
    torch._dynamo.config.trace_autograd_ops = True  # torch.autograd.grad inside the graph
    if variant in REGIONS:  # Inductor reuses a region's output buffer while it is still read
        torch._inductor.config.allow_buffer_reuse = False  # (fxtrain._torch.inductor)
    params = init(layers, variant in STACKED)
    zeros = lambda: {k: torch.zeros_like(p) for k, p in params.items()}  # noqa: E731
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    step = torch.compile(make_step(layers, variant), fullgraph=True, backend=backend())
    c0, w0 = process_tree_cpu(), time.perf_counter()
    p, m, v, t, loss = step(params, zeros(), zeros(), torch.zeros(()), tokens)
    first_cpu, first_wall = process_tree_cpu() - c0, time.perf_counter() - w0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    p, m, v, t, loss2 = step(p, m, v, t, tokens)
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] != frames
    times = []
    for _ in range(5):  # steady steps: the median of 5
        w = time.perf_counter()
        p, m, v, t, _loss = step(p, m, v, t, tokens)
        times.append(time.perf_counter() - w)
    # last: torch's eager scan compiles its body itself, which Dynamo's counters would count
    eager = make_step(layers, variant)(params, zeros(), zeros(), torch.zeros(()), tokens)[-1]
    print(json.dumps({"variant": variant, "layers": layers, "first_cpu_s": first_cpu,
                      "first_wall_s": first_wall, "loss": float(loss),
                      "eager_loss": float(eager), "second_loss": float(loss2),
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
