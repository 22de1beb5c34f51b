"""A language model trained with fxtrain: packed against padded rows of the same documents, and
the chunked cross-entropy against the plain loss inside a GPT-2 train step.

Both parts train transformers' GPT-2 from a config (SDPA attention, dropout 0) with
``fx.fit`` and ``torch.compile(fx.make_train_step(loss), fullgraph=True)``, AdamW, float32,
each variant in a process of its own with one torch thread (the machines are shared), the
variants one after the other in the same run.

**Packed against padded** (``--seq 512``, ``--width 256``, ``--layers 4``, vocabulary 256,
``--batch 8`` rows per step). ``--docs`` documents of random tokens whose lengths are
log-normal (median ``--median 200`` tokens, ``--sigma 1.0``: a few tokens to many times the
median, as web text spreads), clipped to [8, seq], seeded. The same documents two ways:

  padded  one document per row, padded to the sequence length (static shapes under compile;
          the common transformers way pads to the longest in the batch up to a maximum, which
          compiles a graph per length), ``attention_mask`` 0 and labels -100 on the padding
  packed  ``fx.data.pack_documents(documents, seq)``: whole documents laid end to end,
          ``position_ids`` restarting at each, no ``attention_mask`` (transformers' SDPA path
          builds the block-diagonal causal mask from the positions)

Both losses are ``fx.losses.causal_lm`` of the logits; the last batch is left out when short.
Each process trains ``--warmup`` steps (compiling), then one timed pass over all its batches:
its *real tokens per second* counts the tokens trained on (label != -100 after the shift: a
document of n tokens gives n - 1 in both layouts) over the pass's seconds.

**Chunked cross-entropy in a step** (``--ce-vocab 50257``, ``--ce-seq 1024``, ``--ce-batch 1``,
``--ce-width 768`` but ``--ce-layers 2``, so that a step fits this benchmark's time on a CPU;
a full GPT-2 has 12, whose activations the head's loss then weighs less against). Random
tokens, every one labelled. Two losses:

  plain    ``fx.losses.causal_lm(model(ids).logits, labels)``, the LM head's whole logits
  chunked  ``fx.losses.chunked_causal_lm(hidden, weight, labels, chunk_size=--chunk-size)``:
           ``hidden`` from ``model.transformer`` (the final hidden states), ``weight`` the
           tied ``lm_head.weight`` (``transformer.wte.weight``); ``chunked_256`` the same with
           ``chunk_size=256``

The *step's activation memory* is what a train step adds to the process's memory at its peak:
the peak resident set during the timed steps less the resident set just before them, when the
process holds the state (parameters and AdamW's moments), the interpreter and the compiled code.
So it counts the activations, the gradients (one parameter-sized copy, the same in every
variant), the logits and the loss's blocks, and the update's temporaries. Before the timed
steps garbage is collected, freed heap pages go back to the system (glibc's ``malloc_trim``)
and the peak count restarts (``/proc/self/clear_refs``); the processes run with
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's default threshold, kept fixed), so a freed tensor
leaves the resident set. The target: chunked at most 0.6x plain's. The tensors alive before
the step (the state) are reported beside it.

Loss and gradients: the first step of both starts from the same parameters (seeded) on the
same batch; its loss, and AdamW's first moment after it (``(1 - b1)`` times the gradient, the
same op in both, so the relative difference of the gradients), are written to a scratch folder
and compared here: the largest absolute difference over a tensor's largest magnitude, the
largest over the tensors, against a bound of float32 rounding (``ROUNDING``).

Run: python benchmarks/lm.py [--docs 128] [--ce-steps 2] [--ce-batch 1] [--variants ...]
[--smoke] (6.5 min on the 2-core VM with Inductor's on-disk cache warm; on an empty cache each
variant's compiling took 1.5 to 2.5 min more during development). ``--smoke``: tiny sizes, one
or two steps, the first variant in a process of its own, the others in this one, chunked_256
left out, and the steps *not compiled*: compiling its four variants with aot_eager (see
common.backend) took 145 s of run_all's smoke beside the other scripts (its two lanes about
85 s longer); the compiled paths are tested elsewhere (tests/unit/test_packing.py trains
packed rows through transformers' GPT-2 compiled, tests/unit/test_chunked_ce.py the chunked loss
in a compiled step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxtrain as fx
from common import backend, in_fresh_process, scratch_folder
from fxtrain.optim.transforms import ScaleByAdamState
from scale import _resident, _tensor_bytes
from transformer import Cycle, _process_peak, _restart_peak

PACKING = ("padded", "packed")
CHUNKED = ("plain", "chunked", "chunked_256")
LR, WD, B1 = 3e-4, 0.1, 0.9
TARGET = 0.6  # chunked's activation memory at most this times plain's
ROUNDING = 1e-5
"""The largest relative difference of the loss and the gradients that float32 rounding
explains: the head's gradient sums 1024 tokens' terms in another order and grouping (chunks),
about sqrt(1024) = 32 float32 epsilons (1.2e-7) for a random walk of rounding errors, 4e-6;
1e-5 leaves room, and a wrong gradient (a term missing, a wrong scale) is off by far more."""
HEAD = "transformer.wte.weight"  # GPT-2's LM head weight, tied to the embedding (the state's name)


# -- the model and the data -----------------------------------------------------------------


def _gpt2(layers: int, width: int, vocab: int, seq: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        n_layer=layers, n_head=max(1, width // 64), n_embd=width, vocab_size=vocab,
        n_positions=seq, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


class Body(nn.Module):
    """GPT-2 without its head: the final hidden states of ``model.transformer``, its parameters
    under the whole model's names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.transformer = model.transformer

    def forward(self, ids):
        return self.transformer(ids, use_cache=False).last_hidden_state


def _documents(args) -> list[list[int]]:
    """``args.docs`` documents of random tokens (1 to 255: 0 pads), log-normal lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = (math.log(args.median) + args.sigma * torch.randn(args.docs, generator=g)).exp()
    lengths = lengths.round().clamp(8, args.seq).long()
    return [torch.randint(1, 256, (int(n),), generator=g).tolist() for n in lengths]


def _padded(documents: list[list[int]], seq: int) -> dict:
    """One document per row, padded to ``seq``: ids 0, ``attention_mask`` 0, labels -100."""
    ids = torch.zeros(len(documents), seq, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, doc in enumerate(documents):
        ids[row, :len(doc)] = labels[row, :len(doc)] = torch.tensor(doc)
        mask[row, :len(doc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(rows: dict, batch: int) -> list[dict]:
    """Full batches of ``rows`` in order (the last left out when short)."""
    n = len(rows["input_ids"]) // batch
    return [{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()} for i in range(n)]


def _real(batch: dict) -> int:
    """The tokens a batch trains on: labels other than -100 after the shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


# -- the losses -------------------------------------------------------------------------------


def _lm_loss(state, params, batch):
    """``causal_lm`` of the model's logits; every input but the labels goes to the model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = state.apply(params, **inputs, use_cache=False).logits
    return fx.losses.causal_lm(logits, batch["labels"])


def _chunked_loss(chunk_size: int):
    """``chunked_causal_lm`` of the body's hidden states and the tied head weight."""

    def loss_fn(state, params, batch):
        hidden = state.apply(params, batch["input_ids"])
        return fx.losses.chunked_causal_lm(hidden, params[HEAD], batch["labels"],
                                           chunk_size=chunk_size)
    return loss_fn


def _step(loss_fn, compiled: bool):
    step = fx.make_train_step(loss_fn)
    return torch.compile(step, fullgraph=True, backend=backend()) if compiled else step


# -- one variant (in its own process) --------------------------------------------------------


def _timed(state, step, batches: list[dict], warmup: int, steps: int) -> dict:
    """``fx.fit`` to step ``warmup`` (compiling), then ``steps`` timed steps: their seconds,
    CPU time over wall time, the resident set before them and at their peak (the peak count
    restarted), the tensors alive before them (the state)."""
    data, start = Cycle(batches, 10**6), time.perf_counter()
    state = fx.fit(state.replace(data=None), step, data, max_steps=warmup, progress=False)
    warmup_s = time.perf_counter() - start
    cache = {k: torch._dynamo.utils.counters["inductor"][f"fxgraph_cache_{k}"]
             for k in ("hit", "miss")}
    _restart_peak("cpu")
    with warnings.catch_warnings():  # gc's objects include torch.distributed's deprecated names
        warnings.simplefilter("ignore", FutureWarning)
        base, held = _resident(), _tensor_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    fx.fit(state.replace(data=None), step, data, max_steps=warmup + steps, progress=False)
    seconds = time.perf_counter() - start
    peak = _process_peak("cpu")
    return {"warmup_s": warmup_s, "inductor_cache": cache, "seconds": seconds,
            "cpu_use": (time.process_time() - cpu) / seconds, "base_bytes": base,
            "state_bytes": held, "step_peak_bytes": peak, "activation_bytes": peak - base}


def packing(variant: str, args) -> dict:
    """Trains the documents ``variant``'s way: real tokens per second over one pass."""
    documents = _documents(args)
    rows = fx.data.pack_documents(documents, args.seq) if variant == "packed" else \
        _padded(documents, args.seq)
    batches = _batches(rows, args.batch)
    state = fx.TrainState.create(_gpt2(args.layers, args.width, 256, args.seq),
                                 fx.optim.adamw(LR, weight_decay=WD), seed=0)
    run = _timed(state, _step(_lm_loss, args.compiled), batches, args.warmup, len(batches))
    real, slots = sum(map(_real, batches)), len(batches) * args.batch * args.seq
    return {"variant": variant, "rows": len(rows["input_ids"]), "steps": len(batches),
            "real_tokens": real, "fill": real / slots, "tokens_per_s": real / run["seconds"],
            "slots_per_s": slots / run["seconds"], "step_s": run["seconds"] / len(batches),
            **run}


def _first_step(state, step, batches: list[dict], save_to: str):
    """One step of ``fx.fit``, its loss and AdamW's first moment after it saved to
    ``save_to``: the state after it."""
    seen = {}

    def record(state, event):
        if event.kind == "step_end":
            seen["loss"] = float(event.metrics["loss"])

    state = fx.fit(state, step, Cycle(batches, 1), max_steps=1, callbacks=[record],
                   progress=False)
    (adam,) = [s for s in state.opt_state if isinstance(s, ScaleByAdamState)]
    torch.save({"loss": seen["loss"], "mu": adam.mu}, save_to)
    return state


def chunked(variant: str, args) -> dict:
    """Trains with the head's loss taken ``variant``'s way: the step's activation memory and
    tokens/s; the first step's loss and gradients saved to ``args.save_to``."""
    model = _gpt2(args.ce_layers, args.ce_width, args.ce_vocab, args.ce_seq)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    shape = (args.ce_batch, args.ce_seq)
    batches = [{"input_ids": ids, "labels": ids} for ids in
               (torch.randint(0, args.ce_vocab, shape, generator=g) for _ in range(4))]
    if variant == "plain":
        loss_fn = _lm_loss
    else:
        loss_fn = _chunked_loss(256 if variant == "chunked_256" else args.chunk_size)
        model = Body(model)
    state = fx.TrainState.create(model, fx.optim.adamw(LR, b1=B1, weight_decay=WD), seed=0)
    del model  # the state holds the weights
    step = _step(loss_fn, args.compiled)
    start = time.perf_counter()
    state = _first_step(state, step, batches, args.save_to)
    first_s = time.perf_counter() - start  # the first step compiles: part of the warm-up
    run = _timed(state, step, batches, args.ce_warmup, args.ce_steps)
    return {"variant": variant, "params": n_params,
            "tokens_per_s": args.ce_steps * args.ce_batch * args.ce_seq / run["seconds"],
            "step_s": run["seconds"] / args.ce_steps, **run,
            "warmup_s": first_s + run["warmup_s"]}


def child(variant: str, args) -> dict:
    torch.set_num_threads(args.threads)
    return packing(variant, args) if variant in PACKING else chunked(variant, args)


# -- the parent -------------------------------------------------------------------------------


def arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--median", type=float, default=200.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ce-vocab", type=int, default=50257)
    parser.add_argument("--ce-seq", type=int, default=1024)
    parser.add_argument("--ce-width", type=int, default=768)
    parser.add_argument("--ce-batch", type=int, default=1)
    parser.add_argument("--ce-layers", type=int, default=2)
    parser.add_argument("--ce-warmup", type=int, default=1, help="(the first step included)")
    parser.add_argument("--ce-steps", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"default: all ({' '.join(PACKING + CHUNKED)}); --smoke: not "
                             "chunked_256 (chunked's code with another chunk size)")
    parser.add_argument("--save-to", default=None, help="(a child's loss and gradient file)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.compiled = not args.smoke
    if args.smoke:
        args.docs, args.median, args.seq, args.width, args.layers, args.batch = 24, 12, 32, 32, \
            1, 4
        args.warmup, args.ce_vocab, args.ce_seq, args.ce_width, args.ce_layers = 1, 512, 64, \
            32, 1
        args.ce_steps, args.chunk_size = 1, 32
    if args.variants is None:
        args.variants = [*PACKING, *CHUNKED[:2 if args.smoke else 3]]
    return args


def run_child(variant: str, argv: list[str], fresh: bool) -> dict:
    """``variant`` in a fresh process (its peak its own), or with ``fresh=False`` in this one
    (a smoke run's later variants: their numbers are not reported)."""
    if not fresh:
        return child(variant, arguments(argv))
    return in_fresh_process(__file__, [variant, *argv], variant, timeout=1800)


def relative_differences(files: dict[str, str], base: str = "plain") -> dict:
    """Each chunked variant's loss and gradients against ``base``'s, from the saved files:
    |a - b| / |b| for the loss; for the gradients the largest over the tensors of
    max |a - b| / max |b|."""
    saved = {v: torch.load(f) for v, f in files.items()}
    ref = saved.pop(base)
    out = {}
    for variant, got in saved.items():
        grads = max(float((got["mu"][k] - m).abs().max() / m.abs().max())
                    for k, m in ref["mu"].items())
        loss = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
        out[variant] = {"loss": loss, "grads": grads,
                        "within_rounding": max(loss, grads) <= ROUNDING}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def summarise(rows: dict, diffs: dict) -> dict:
    """The ratios of the rows (packed over padded; each chunked over plain), and prints them."""
    out = {}
    if set(PACKING) <= set(rows):
        padded, packed = rows["padded"], rows["packed"]
        out["packed_vs_padded"] = _ratio(packed["tokens_per_s"], padded["tokens_per_s"])
        per_cpu = (packed["tokens_per_s"] / packed["cpu_use"]) / (
            padded["tokens_per_s"] / padded["cpu_use"])
        print(f"packed {packed['tokens_per_s']:.0f} real tokens/s (fill {packed['fill']:.2f}), "
              f"padded {padded['tokens_per_s']:.0f} (fill {padded['fill']:.2f}): "
              f"{out['packed_vs_padded']:.2f}x ({per_cpu:.2f}x per CPU second)", flush=True)
    for variant in (v for v in CHUNKED[1:] if v in rows and "plain" in rows):
        memory = _ratio(rows[variant]["activation_bytes"], rows["plain"]["activation_bytes"])
        out[f"{variant}_memory_vs_plain"] = memory
        out[f"{variant}_tokens_vs_plain"] = _ratio(rows[variant]["tokens_per_s"],
                                                   rows["plain"]["tokens_per_s"])
        d = diffs.get(variant, {})
        print(f"{variant}: activation memory {rows[variant]['activation_bytes'] / 2**20:.0f} MiB"
              f" against {rows['plain']['activation_bytes'] / 2**20:.0f} MiB, {memory:.2f}x "
              f"(target <= {TARGET}); loss {d.get('loss', math.nan):.1e}, gradients "
              f"{d.get('grads', math.nan):.1e} relative difference", flush=True)
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], arguments(argv[2:]))
    args = arguments(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the children's resident set: live tensors
    start, folder, rows, files = time.perf_counter(), scratch_folder("fxtrain-lm-"), {}, {}
    for i, variant in enumerate(args.variants):
        if variant in CHUNKED:  # where its first step's loss and gradients go
            files[variant] = str(Path(folder) / f"{variant}.pt")
        saving = ["--save-to", files[variant]] if variant in files else []
        rows[variant] = run_child(variant, [*argv, *saving], fresh=not args.smoke or i == 0)
        print(f"{variant}: {json.dumps(rows[variant])}", flush=True)
    diffs = relative_differences(files) if "plain" in files else {}
    return {"config": {k: v for k, v in vars(args).items() if k != "save_to"},
            "target": TARGET, "rounding": ROUNDING, "rows": rows, "differences": diffs,
            **summarise(rows, diffs), "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(main()))
    else:
        print(json.dumps(main(), indent=1))
