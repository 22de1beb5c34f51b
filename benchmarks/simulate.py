"""Past our machines, by simulation: what one rank of a large job holds, fx.shard against FSDP2.

One process plays rank 0 of a job of 8, 64 or 256 ranks: torch's fake process group
(``init_process_group("fake")``: every collective returns at once without moving data) stands in
for the others, and the model lives on fake tensors (``FakeTensorMode``: shapes, dtypes and
storages, no data and no arithmetic), so a Llama-3-8B-shaped or 70B-shaped model of its full
depth runs whole training steps on this CPU in a few minutes. Everything is measured on those
steps; nothing is extrapolated by layer count:

- what the rank holds between steps: its shards of the parameters and of the optimizer state
  (AdamW's two moments), and the gradient shards the step hands the optimizer (one per
  parameter shard, of its bytes);
- the step's peak: the most bytes of tensors alive at once during one training step (the
  second: FSDP2's AdamW makes its state in the first), counted by a ``TorchDispatchMode`` that
  follows every storage an op makes until it is freed (and resizes, as FSDP2 frees its gathered
  parameters), from the state held when the step begins;
- the activations at that peak: the part of the peak that grows with the tokens, measured as
  the difference between the peaks of two runs, one with twice the tokens of the other (so it
  counts what scales with batch x sequence: the blocks' saved activations, the logits and the
  loss's softmax). Activations scale linearly with batch x sequence per rank;
- the bytes of each collective per step: all-gathers counted by the gathered (output) tensor,
  reduce-scatters by the tensor reduced (input), all-reduces by the tensor, on the rank (a ring
  moves (N-1)/N of it over the rank's link each way).

Layouts: ``fsdp``, every rank a data replica sharding the model over a 1-D mesh (fxtrain:
``fx.shard(state)``, per-block units; FSDP2: ``fully_shard`` on each decoder layer, then on the
root, ``torch.optim.AdamW(foreach=True)``, ``zero_grad(set_to_none=True)``), and ``fsdp_tp``,
an 8-wide tensor-parallel group on the second dimension of a 2-D mesh (fxtrain: ``fx.shard(state,
mesh((N/8, 8), ("dp", "tp")), tp_plan="auto")``; FSDP2: ``parallelize_module`` with the same plan
on the "tp" dimension, then ``fully_shard`` over "dp", as torchtitan does). The model is
transformers' ``LlamaForCausalLM`` from a config (SDPA attention, untied embeddings), float32
parameters, gradients and compute (no mixed precision), no activation checkpointing, AdamW,
``--batch`` sequences of ``--seq`` tokens per data replica, the cross-entropy of the next token;
attention is SDPA's causal path with no mask, as on real tensors (``_whole_sequences``).

Long sequences: ``fsdp_cp<C>`` and ``fsdp_tp_cp<C>`` add a context-parallel dimension of C
ranks (fxtrain: ``fx.shard(state, mesh, context="cp")`` on ``(dp, cp)`` or ``(dp, cp, tp)``:
each sequence of ``--seq`` tokens split over the C ranks, attention a ring over them; the
parameters sharded over dp x cp, per block). FSDP2 has no row there: torch's
``context_parallel()`` rings SDPA's CUDA kernels only, so torchtitan's recipe does not run on
this CPU.

Activation checkpointing: a layout ending ``_remat`` (``fsdp_cp8_remat``) turns on
transformers' gradient checkpointing (non-reentrant, every decoder layer), as a user of a
transformers model does; fxtrain only, FSDP2's rows have none.

Run: python benchmarks/simulate.py [--out P] [--smoke] (``--out P`` writes P.json and P.md).
    python benchmarks/simulate.py --seq 32768 --runs llama3-8b:fsdp_cp8:8 llama3-70b:fsdp_tp_cp4:256
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import re
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

MODELS = {  # LlamaConfig's sizes: Llama 3 8B and 70B, and a tiny one for --smoke and the tests
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=8, vocab_size=256),
}
RUNS = (("llama3-8b", "fsdp", 8), ("llama3-70b", "fsdp", 64), ("llama3-70b", "fsdp_tp", 64),
        ("llama3-8b", "fsdp", 256), ("llama3-70b", "fsdp", 256),
        ("llama3-70b", "fsdp_tp", 256))
TP = 8
LR, WD = 3e-4, 0.1
KINDS = ("all_gather", "reduce_scatter", "all_reduce")


class Tracker(TorchDispatchMode):
    """The bytes of tensors alive during the ops it sees (``now``, its ``peak``), starting from
    the ``held`` tensors, and the bytes of each collective (``moved``, by kind)."""

    def __init__(self, held):
        super().__init__()
        self.live: dict[int, int] = {}  # id of a storage -> its bytes
        self.now = 0
        self.moved: dict[str, int] = collections.Counter()
        for t in held:
            self.hold(t.untyped_storage())
        self.peak = self.now

    def hold(self, storage, before: int = 0) -> None:
        key = id(storage)
        if key not in self.live:
            self.live[key] = before
            weakref.finalize(storage, self._freed, key)
        self._resized(key, storage.nbytes())

    def _resized(self, key: int, nbytes: int) -> None:
        self.now += nbytes - self.live[key]
        self.live[key] = nbytes

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local ops (and collectives) through us
        if func.namespace == "fxtrain" and func._opname.startswith("ring_attention"):
            # context parallelism's ring, a custom op: its collectives and temporaries through
            # us, as a traced step records them (its decomposition)
            TorchDispatchMode.__enter__(self)
            try:
                return func.decompose(*args, **(kwargs or {}))
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        out = func(*args, **(kwargs or {}))
        kind = _collective(func)
        if kind:  # the gathered tensor (c10d's ops take it first), the reduced one
            c10d = func.namespace == "c10d"
            tensor = (args[0] if c10d else out) if kind == "all_gather" else \
                args[1] if c10d and kind == "reduce_scatter" else args[0]
            tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
            self.moved[kind] += tensor.nbytes
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.hold(t.untyped_storage())
        self.peak = max(self.peak, self.now)
        return out

    def __enter__(self):  # FSDP2 frees and re-allocates its gathered parameters by resizing
        resize = self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            before = storage.nbytes()
            out = resize(storage, size)
            tracker.hold(storage, before if id(storage) not in tracker.live else 0)
            tracker.peak = max(tracker.peak, tracker.now)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


def _collective(func) -> str | None:
    """Which kind of collective ``func`` is (None: none), by its op's name: the functional
    collectives fxtrain and DTensor call, and the c10d ops FSDP2 calls."""
    namespace, name = func.namespace, func._opname
    if namespace not in ("_c10d_functional", "c10d", "c10d_functional") or "coalesced" in name:
        return None
    name = name.replace("_", "").replace("allgather", "all_gather").replace(
        "reducescatter", "reduce_scatter").replace("allreduce", "all_reduce")
    return next((k for k in KINDS if k in name), None)


def _storages(tree) -> list:
    """The tensors of ``tree`` as storages to hold (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor
    return [t.to_local() if isinstance(t, DTensor) else t for t in pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def _config(model: str):
    import transformers
    return transformers.LlamaConfig(**MODELS[model], max_position_embeddings=8192,
                                    use_cache=False, attn_implementation="sdpa",
                                    tie_word_embeddings=False)


def _loss(logits, ids):
    logits = logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


VARIANTS = ("fxtrain", "fsdp2")


_LAYOUT = re.compile(r"fsdp(_tp)?(?:_cp(\d+))?(_remat)?")


def context_size(layout: str) -> int:
    """The context-parallel ranks of ``layout`` (``fsdp_cp8``: 8; 1 without)."""
    return int(_LAYOUT.fullmatch(layout).group(2) or 1)


def _context(layout: str) -> bool:
    """Whether ``layout`` runs context parallelism's path (``fsdp_cp1``: of one rank, the
    same path with whole sequences: what a context-parallel rank's figures compare with)."""
    return _LAYOUT.fullmatch(layout).group(2) is not None


def _tp(layout: str) -> bool:
    return _LAYOUT.fullmatch(layout).group(1) is not None


def _remat(layout: str) -> bool:
    """Whether ``layout`` recomputes each decoder layer in the backward (``fsdp_cp8_remat``:
    transformers' gradient checkpointing, non-reentrant, as a user of a transformers model
    turns it on)."""
    return _LAYOUT.fullmatch(layout).group(3) is not None


def _mesh(layout: str, world: int):
    import fxtrain as fx
    cp, tp = context_size(layout), TP if _tp(layout) else 1
    if not _context(layout):
        return fx.sharding.mesh() if tp == 1 else fx.sharding.mesh((world // TP, TP), ("dp", "tp"))
    if tp == 1:
        return fx.sharding.mesh((world // cp, cp), ("dp", "cp"))
    return fx.sharding.mesh((world // (cp * tp), cp, tp), ("dp", "cp", "tp"))


def _context_loss(s, p, batch):
    """A context-parallel rank's loss: its slice's logits against the labels shifted on the
    whole sequence (``fxtrain.distributed._context``)."""
    import fxtrain as fx
    logits = s.apply(p, input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    return fx.losses.causal_lm(logits, batch["shift_labels"], shift=False)


def fxtrain(model_name: str, layout: str, mesh, mode):
    """fx.shard's rank: (what it holds, a function of a batch that runs one step)."""
    import transformers

    import fxtrain as fx
    with mode:
        model = transformers.LlamaForCausalLM(_config(model_name))
        if _remat(layout):
            model.gradient_checkpointing_enable({"use_reentrant": False})
        state = fx.TrainState.create(model, fx.optim.adamw(LR, weight_decay=WD))
        context = "cp" if _context(layout) else None
        state = fx.shard(state, mesh, tp_plan="auto" if _tp(layout) else None, context=context)
    del model
    if context is None:
        step = fx.make_train_step(lambda s, p, ids: _loss(s.apply(p, ids).logits, ids))
    else:
        step = fx.make_train_step(_context_loss)
    box = {"state": state}
    del state

    def held():
        s = box["state"]
        return {"params": _storages(s.params), "opt_state": _storages(s.opt_state),
                "other": _storages((s.buffers, s.rng, s.step))}

    def train(ids):
        batch = ids if context is None else {"input_ids": ids, "labels": ids}
        box["state"], _ = step(box.pop("state"), batch, donate=True)  # as fx.fit does

    return held, train


def fsdp2(model_name: str, layout: str, mesh, mode):
    """FSDP2's rank (see the module): (what it holds, a function of a batch: one step). As
    torchtitan estimates memory: the model made and parallelized on the meta device, then its
    parameters given storage (``to_empty``) under the fake mode."""
    import transformers
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    import fxtrain as fx
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(model_name))
    if _context(layout):
        raise ValueError(f"{layout}: torch's context_parallel() rings SDPA's CUDA kernels only; "
                         "FSDP2 with it does not run on this CPU")
    data = mesh
    if layout == "fsdp_tp":
        parallelize_module(model, mesh["tp"], fx.distributed.plan_of(model, "auto"))
        data = mesh["dp"]
    for block in model.model.layers:
        fully_shard(block, mesh=data)
    fully_shard(model, mesh=data)
    with mode:
        model.to_empty(device="cpu")
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.new_ones(
            model.model.rotary_emb.inv_freq.shape)  # a buffer to_empty left without values
        opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, foreach=True)

    def held():
        return {"params": _storages(list(model.parameters())),
                "opt_state": _storages(list(opt.state.values())),
                "other": _storages(list(model.buffers()))}

    def train(ids):
        opt.zero_grad(set_to_none=True)
        _loss(model(ids).logits, ids).backward()
        opt.step()

    return held, train


def measure(run, held, tokens: tuple[int, int], vocab: int) -> dict:
    """One step under a ``Tracker``: what the rank holds before it, its peak, the bytes of its
    collectives."""
    ids = torch.randint(0, vocab, tokens)
    before = held()
    every = [t for part in before.values() for t in part]
    with Tracker(every) as tracker:
        run(ids)
    return {**{f"{k}_bytes": _nbytes(v) for k, v in before.items()},
            "held_bytes": _nbytes(every), "peak_bytes": tracker.peak,
            **{f"{k}_bytes": tracker.moved[k] for k in KINDS}}


@contextlib.contextmanager
def _whole_sequences():
    """transformers' causal mask as an eager step on real tensors makes it: none. Without an
    ``attention_mask``, transformers reads the positions (``find_packed_sequence_indices``) and,
    finding one sequence a row, leaves SDPA its ``is_causal`` (no mask); on fake tensors it
    cannot read them (``is_tracing`` counts a fake tensor as tracing), takes them for packed
    documents and builds a ``batch x 1 x seq x seq`` mask, which SDPA turns to float and keeps
    for the backward, a layer's each: quadratic in the tokens, and no real eager step's (the
    tiny Llama on 2 ranks, 2048 tokens: 33.6 MB of an 83.8 MB peak, and 152.5 MB of
    activations to the real ranks' 47.6). Every sequence here is one document (the model's own
    positions, or context parallelism's slices of them), so the fake step is told so."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import masking_utils
    find = masking_utils.find_packed_sequence_indices

    def found(position_ids):
        return None if isinstance(position_ids, FakeTensor) else find(position_ids)

    masking_utils.find_packed_sequence_indices = found
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


def simulate(model_name: str, layout: str, world: int, variant: str, batch: int, seq: int,
             fake: bool = True) -> dict:
    """This process's row as rank 0 of ``world``: ``variant`` ("fxtrain" or "fsdp2") training
    ``model_name`` laid out as ``layout``: a warm-up step, then a step of ``batch`` x ``seq``
    tokens and one of twice as many (the activations: the difference of their peaks).
    ``fake``: on fake tensors (else on real ones, in a real process group of ``world``)."""
    from torch._subclasses import fake_tensor
    # fxtrain: no fake scalar backed by a real one (its donation's copy_ into the state's
    # scalars ran on them for real, and crashed on the 2-D mesh); FSDP2's AdamW reads its step
    # counts on the host (.item()), which needs them
    fake_tensor.CONSTANT_NUMEL_LIMIT = 0 if variant == "fxtrain" else 1
    mesh = _mesh(layout, world)
    torch.manual_seed(0)
    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    held, run = (fxtrain if variant == "fxtrain" else fsdp2)(model_name, layout, mesh, mode)
    vocab = MODELS[model_name]["vocab_size"]
    with mode, _whole_sequences():
        run(torch.randint(0, vocab, (batch, seq)))  # FSDP2's AdamW makes its state here
        one = measure(run, held, (batch, seq), vocab)
        two = measure(run, held, (batch, 2 * seq), vocab)
    return {**one, "activation_bytes": two["peak_bytes"] - one["peak_bytes"],
            "grads_bytes": one["params_bytes"], "model": model_name, "layout": layout,
            "world": world, "variant": variant, "batch": batch, "seq": seq}


def _rows(index: int, groups: list, args, folder: str) -> None:
    """A fresh process: each run of ``groups[index]`` in turn as rank 0 of a fake group of its
    world (one group for the runs of one world next to each other: ``fx.sharding.mesh`` makes a
    mesh once per process, on the group of its time), their rows in ``folder``."""
    import torch.distributed as dist
    rows, world_now = [], None
    try:
        for model, layout, world, variant in groups[index]:
            if world != world_now:
                if world_now is not None:
                    dist.destroy_process_group()
                dist.init_process_group("fake", rank=0, world_size=world)
                world_now = world
            rows.append(simulate(model, layout, world, variant, args.batch, args.seq))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(folder, f"rows{index}.json").write_text(json.dumps(rows))
    # out without the interpreter's teardown, where a simulated FSDP x TP run's leftovers
    # corrupted the heap ("corrupted double-linked list", SIGABRT or SIGSEGV after its rows were
    # written: 3 exits in 3 of a process of two worlds, and both 70B FSDP x TP runs, at a9600f1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def jobs(groups: list, args) -> list[list[dict]]:
    """The rows of each group of runs (model, layout, ranks, variant), a fresh process per
    group, side by side, its runs one after the other (those of one world next to each other;
    FSDP2's after fxtrain's in one process crashed in ``fully_shard``, fxtrain's after FSDP2's
    at the process's exit: give each variant its own). ``main`` gives each run a process of
    its own (``job``)."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rows, args=(list(groups), args, folder), nprocs=len(groups))
        return [json.loads(Path(folder, f"rows{i}.json").read_text())
                for i in range(len(groups))]


def job(run: tuple, args) -> dict:
    """The row of ``run``, in a fresh process."""
    return jobs([[run]], args)[0][0]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def markdown(result: dict) -> str:
    """The table: per run, fx.shard's and FSDP2's figures side by side (GiB)."""
    config = result["config"]
    lines = ["## What one rank holds, simulated (`benchmarks/simulate.py`)", "",
             f"Command: `{result['command']}` ({result['minutes']:.1f} min, {result['date']}, "
             f"torch {result['torch']}). One CPU process plays rank 0 on torch's fake process "
             "group with fake tensors: every figure is measured on a full-depth training step, "
             f"none extrapolated. Llama 3 shapes, float32, AdamW, no activation checkpointing, "
             f"{config['batch']} x {config['seq']} tokens per data replica (activations scale "
             "linearly with them). GiB per rank, fx.shard / FSDP2.", "",
             "| model | layout | ranks | params | grads | optimizer | activations | step peak "
             "| all-gather | reduce-scatter | all-reduce |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        fx, f2 = row["fxtrain"], row.get("fsdp2")
        cells = [f"{_gib(fx[k])} / {_gib(f2[k]) if f2 else '-'}" for k in (
            "params_bytes", "grads_bytes", "opt_state_bytes", "activation_bytes", "peak_bytes",
            "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes")]
        lines.append(f"| {row['model']} | {_described(row['layout'], row['world'])} | "
                     f"{row['world']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _described(layout: str, world: int) -> str:
    """``fsdp_tp_cp4`` on 256 ranks: "FSDP x CP x TP 8x4x8"."""
    cp, tp = context_size(layout), TP if _tp(layout) else 1
    context = _context(layout)
    names = ["FSDP"] + (["CP"] if context else []) + (["TP"] if tp > 1 else [])
    sizes = [world // (cp * tp)] + ([cp] if context else []) + ([tp] if tp > 1 else [])
    return " x ".join(names) + ("" if len(sizes) == 1 else " " + "x".join(map(str, sizes))) \
        + (", each layer recomputed" if _remat(layout) else "")


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=[f"{m}:{l}:{w}" for m, l, w in RUNS],
                        help="model:layout:ranks, e.g. llama3-70b:fsdp_tp:64")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:  # the tiny model, each layout; a process per variant (main)
        args.seq, args.runs = 16, ["tiny:fsdp:8", "tiny:fsdp_tp:16"]
    for name in ("seq", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.parsed = [_run(parser, text) for text in args.runs]
    return args


def _run(parser: argparse.ArgumentParser, text: str) -> tuple[str, str, int]:
    """``model:layout:ranks`` checked: a model of MODELS, fsdp or fsdp_tp, a rank count the
    layout takes (fsdp_tp: a multiple of TP)."""
    parts = text.split(":")
    if len(parts) != 3:
        parser.error(f"--runs takes model:layout:ranks (e.g. llama3-70b:fsdp_tp:64), got {text!r}")
    model, layout, ranks = parts
    if model not in MODELS:
        parser.error(f"--runs {text!r}: model must be one of {', '.join(MODELS)}, got {model!r}")
    if _LAYOUT.fullmatch(layout) is None or context_size(layout) < 1:
        parser.error(f"--runs {text!r}: layout must be fsdp, fsdp_tp, fsdp_cp<C> or "
                     f"fsdp_tp_cp<C> (C context-parallel ranks), each optionally ending "
                     f"_remat (every layer recomputed), got {layout!r}")
    if not ranks.isdigit() or int(ranks) < 1:
        parser.error(f"--runs {text!r}: ranks must be a positive int, got {ranks!r}")
    group = (TP if _tp(layout) else 1) * context_size(layout)
    if int(ranks) % group:
        parser.error(f"--runs {text!r}: {layout} takes a multiple of {group} ranks, got {ranks}")
    return model, layout, int(ranks)


def main(argv=None) -> dict:
    args = _arguments(argv)
    start = time.perf_counter()
    runs = args.parsed
    if args.smoke:  # a process per variant, its runs in turn (a process start cost more)
        by_variant = dict(zip(VARIANTS, jobs([[(*run, v) for run in runs] for v in VARIANTS],
                                             args)))
    rows = []
    for i, (model, layout, world) in enumerate(runs):
        row = {"model": model, "layout": layout, "world": world}
        for variant in VARIANTS:
            if variant == "fsdp2" and _context(layout):
                continue  # torch's context parallelism rings CUDA kernels only (see the module)
            row[variant] = by_variant[variant][i] if args.smoke else \
                job((model, layout, world, variant), args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"config": {"seq": args.seq, "batch": args.batch}, "rows": rows,
              "command": "python benchmarks/simulate.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "minutes": (time.perf_counter() - start) / 60}
    text = markdown(result)
    print(text, flush=True)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
