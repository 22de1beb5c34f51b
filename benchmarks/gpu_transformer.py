"""A language model on a GPU: fx.fit's paths against the loops a competent PyTorch user writes
(nanoGPT's and torch's compiled-step recipe) and transformers' Trainer, in tokens/s, MFU, peak
memory, attention kernel and compile time. The one benchmark of the GPU kit
(``scripts/gpu.sh``; docs/benchmarks.md).

The model (``--model``, gpu_models.py): GPT-2 124M written plainly (``nano``), transformers'
GPT-2 (``hf``) or a Llama-shaped 1B (``llama``: transformers' ``LlamaForCausalLM`` from a config
of Llama-3.2-1B's shape), trained on random tokens, sequence ``--seq``, ``--batch`` sequences
per step (``auto``: the largest that fits the ``loop`` baseline, from its compiled steps at
batch 2 and 4 and the device's memory), AdamW (``--lr`` 3e-4, ``--weight-decay`` 0.1 on every
parameter), ``--precision`` (bf16-mixed; ``32``; ``fp8``, below), dropout ``--dropout`` (several
values: each its own set of runs). Each
variant runs in a process of its own (``--rounds``: the order rotates each round, and tokens/s
is the median). The baselines, the same model, data, batch and AdamW settings:

  loop         nanoGPT's loop: torch.compile of the model with its loss inside its forward
               (``gpu_models.LossInside``: the logits in autocast's dtype, the cross-entropy in
               float32, both in the compiled graph), loss.backward(), AdamW(fused=True),
               zero_grad(set_to_none=True), autocast to bf16. Its dropout is torch's own
  loop_step    the whole step (forward with the loss inside, backward, AdamW.step, zero_grad)
               under one torch.compile: torch's compiled-optimizer recipe (the "Compiling the
               optimizer" tutorial compiles ``opt.step()``; here it joins the step). Dynamo
               splits it at ``loss.backward()``: the forward graph with its compiled backward,
               then the optimizer's graph (AdamW's default implementation, fused by Inductor)
  loop_regional  torch's regional recipe (torchtitan's ``apply_compile``): each repeated block
               compiled on its own (``block.compile()``: one block traced and compiled, its code
               reused by the others), the loss inside the model, the rest eager, AdamW as
               ``loop``'s (fused on CUDA: torchtitan's, not compiled). The anchor for
               fx_regional's first step and tokens/s
  loop_eager_loss  the kit's loop until issue 58, kept as an extra row, never a baseline:
               torch.compile(model) returns the logits and the loss runs outside the compiled
               graph, eagerly, on a float32 copy of them

and fxtrain's variants:

  fx_func      fx.fit, torch.compile(fx.make_train_step(loss, precision="bf16-mixed"),
               fullgraph=True): gradients by torch.func. Dropout is keyed on (seed, step)
  fx_autograd  the same with autodiff="autograd"
  fx_regional  fx_func over ``fx.regional(state)``: each block traced and compiled once inside
               the one step graph, autodiff="auto" (autograd's path, which regions take)
  fx_shard     fx.fit of the step not compiled over ``fx.shard(state, units="auto")`` (per-block
               units) in a one-rank process group (NCCL on CUDA, gloo on the CPU): under fp8 the
               units gather the float8 layers' weights in float8
               (``enable_fsdp_float8_all_gather``, eager with per-block units: where fxtrain runs
               it), so its ``:fp8`` row against its bf16 row is the float8 policy with its
               all-gather against bf16 on the same sharded path; one device moves no bytes
               between ranks, so the figure is the casts' and the gather's own cost, not the
               network's saving
  fx_graphed   fx_func's step through fx.cuda_graphed (a CUDA GPU only)
  fx_k         fx_func with steps_per_call=--k (K steps in one graph per call)
  fx_remat     fx_autograd with every block through fx.remat (nothing_saveable)
  fx_chunked   fx_func with the loss fx.losses.chunked_causal_lm(impl="chunked") of the final
               hidden states and the head's weight, ``--chunk`` tokens at a time: fxtrain's own
               kernel, never the whole logits
  fx_liger     the same with impl="liger": Liger-Kernel's fused linear cross-entropy (a CUDA
               GPU with liger-kernel installed only)
  fx_remat_chunked  fx_remat with the chunked loss, impl="auto" (Liger's kernel where it runs)
  hf_trainer   transformers.Trainer, torch_compile=True, bf16=True, the same AdamW on every
               parameter (fused), batches in order, no clipping

``--big-variants`` run at ``--big-batch`` (``auto``: the smallest batch the probe says the loop
cannot fit in the device's memory; twice ``--batch`` without a probe): fx.remat with the chunked
loss at a batch the baselines cannot hold.

``--precision fp8``: fxtrain's float8 policy (``fx.precision.float8``: bf16 autocast, the linear
layers' products in float8 on torchao, torchtitan's filter: not the head), emulated off a CUDA
device (the CPU smoke run). The model is converted before it is trained: fxtrain's variants by the
policy's ``convert`` (``fx.precision.float8().convert(model)`` before the state), the loops by
torchao's own ``convert_to_float8_training`` with the same layers and settings (torchao's recipe,
as its user writes it). ``--fp8-variants`` run again in fp8 after their row at ``--precision``,
at the same batch, as rows ``<variant>:fp8``, each with its tokens/s and peak over its variant's
at ``--precision`` (the same run). Without torchao installed (it is carried as a pinned wheel,
scripts/gpu_wheels.py) an fp8 row says "torchao not installed" and the others run.

``--demo transformer`` runs ``fxtrain demo --model transformer`` instead, with its default flags
(``--no-progress``), in a process of its own, and reads what it printed: the held-out loss, bits
per character and accuracy it ended with, whether it ended finite (no ``nan_guard`` stop), its
steps/s after the first step, the precision it chose (``native_bf16()``: bf16-mixed where the
machine computes bfloat16) and the device it trained on (fit's summary). Its target is the
transformer's reference run in docs/demo.md (the docs state no target of the transformer's own,
none for a GPU: its 2.76 bits per character after 1000 steps, as the docs round it), judged at
the default steps only (``gpu_report.demo_verdict``). ``--demo-timeout`` stops it (Ctrl-C: it
saves and says where) and the row says so.

Per variant: tokens/s over ``--steps`` timed steps after ``--warmup``; MFU = tokens/s x FLOPs a
token (gpu_models.flops_per_token: nanoGPT's and torchtitan's count) / the device's dense bf16
peak (``--peak-tflops``, else from the device's name); peak memory
(``torch.cuda.max_memory_allocated`` over the process) per parameter; the attention kernels
that ran, read from a profile of one more step (flash / efficient / cudnn, or ``none``); the
first step's seconds (compiling, from Inductor's on-disk cache when it holds the graphs).
Ratios are to both fair loops of the run, and targets are judged against the stronger
(gpu_report.py). ``--md FILE`` writes the run as a section for benchmarks/gpu/RESULTS.md.

``--device cpu --tiny`` runs every variant at a tiny size (2 blocks of width 64, vocabulary
256, sequence 64) with torch.compile's ``aot_eager`` backend, the first variant in a process of
its own and the rest in this one, and ``--demo`` for 4 eager steps: the suite's smoke test,
so the kit cannot rot between GPU draws. ``trained_loss`` trains one variant for a number of
steps and returns the loss its weights give on a held-out batch: every variant must train the
same model (tests/tools/test_gpu_kit.py).

Run: python benchmarks/gpu_transformer.py [--model nano|hf|llama] [--variants ...]
     [--dropout 0 0.1] [--batch auto] [--steps 20] [--warmup 5] [--rounds 1] [--chunk 16384]
     [--big-variants ...] [--big-batch auto] [--precision bf16-mixed|32|fp8]
     [--fp8-variants ...] [--out FILE.json] [--md FILE.md] [--tiny]
     python benchmarks/gpu_transformer.py --demo transformer [--demo-timeout 240] [--md ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import backend, use_smoke_backend
from gpu_models import (MODELS, LossInside, flops_per_token, head_weight, model_of, use_remat,
                        vocab)
from gpu_report import (BASELINES, against_anchor, against_full_logits, against_precision,
                        demo_figures, demo_section, demo_target, demo_verdict, markdown, ratios, section,
                        summary, targets)
from nanogpt import lm_loss
from transformer import _process_peak as peak, _restart_peak as restart_peak

VARIANTS = ("loop", "loop_step", "loop_regional", "loop_eager_loss", "fx_func", "fx_autograd",
            "fx_regional", "fx_shard", "fx_graphed", "fx_k", "fx_remat", "fx_chunked", "fx_liger",
            "fx_remat_chunked", "hf_trainer")
LOOPS = ("loop", "loop_step", "loop_regional", "loop_eager_loss")
REMAT = ("fx_remat", "fx_remat_chunked")
AUTOGRAD = ("fx_autograd", *REMAT)
CHUNKED = {"fx_chunked": ("fx_func",), "fx_liger": ("fx_func",),  # -> the whole logits'
           "fx_remat_chunked": ("fx_remat", "fx_func")}
IMPL = {"fx_chunked": "chunked", "fx_liger": "liger", "fx_remat_chunked": "auto"}
GPU_ONLY = ("fx_graphed", "fx_liger")
EAGER = ("fx_shard",)  # fx variants whose step is not compiled
FP8 = "fp8"  # the float8 policy's name (fx.precision.float8("tensorwise"))
PEAK_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
               ("L4", 121.0), ("A10", 125.0))  # dense bf16, by device name (SXM figures)
KERNELS = (("flash", ("flash_attention", "flash_fwd", "flash_bwd", "pytorch_flash")),
           ("efficient", ("efficient_attention", "fmha_cutlass", "mem_efficient")),
           ("cudnn", ("cudnn_attention", "fort_native_sdpa", "cudnn_generated")))


def batches_of(args, device, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab(args), (args.batch, args.seq), generator=g).to(device)
            for _ in range(n)]


def peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# -- what ran ---------------------------------------------------------------------------------


def attention_kernels(names) -> str:
    """The fused attention kernels among profiled op and kernel names, or ``none``."""
    text = " ".join(names).lower()
    found = [kind for kind, marks in KERNELS if any(m in text for m in marks)]
    return "+".join(found) or "none"


def profiled(step, device) -> str:
    """``attention_kernels`` of one call of ``step()`` under torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    return attention_kernels({e.name for e in prof.events()})


def sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- precision ----------------------------------------------------------------------------------


def step_precision(args, variant: str = "fx_func"):
    """The fx step's precision: ``--precision``'s name, or for fp8 the policy itself, emulated
    off a CUDA device (the CPU smoke run; a GPU without float8 products refuses it by name),
    gathering its weights in float8 for ``fx_shard``."""
    if args.precision != FP8:
        return args.precision
    import fxtrain as fx
    return fx.precision.float8(emulate=args.device != "cuda",
                               enable_fsdp_float8_all_gather=variant == "fx_shard")


def model_for(variant: str, args):
    """``model_of(args)``, under ``--precision fp8`` with its linear layers made float8 by the
    variant's recipe: the policy's ``convert`` for fxtrain's variants, torchao's own
    ``convert_to_float8_training`` for the loops (what a user of torchao writes), both with the
    policy's layers (torchtitan's filter: not the head) and torchao settings."""
    model = model_of(args)
    if args.precision != FP8:
        return model
    policy = step_precision(args, variant)
    if variant not in LOOPS:
        return policy.convert(model)
    from torchao.float8 import convert_to_float8_training
    return convert_to_float8_training(model, config=policy.float8.config(),
                                      module_filter_fn=policy.float8.filter)


def missing(precision: str) -> str | None:
    """Why a row at ``precision`` cannot run here (fp8 without torchao), or None."""
    if precision == FP8 and importlib.util.find_spec("torchao") is None:
        return "torchao not installed"
    return None


# -- the variants: each a Run over the child's model and batches -------------------------------


class Run:
    """A variant ready to train: ``calls(n)`` makes n calls of ``steps_per_call`` steps each,
    ``trained()`` is the module with the weights trained so far."""

    def __init__(self, calls, trained, tokens_per_call, steps_per_call=1):
        self.calls, self.trained = calls, trained
        self.tokens_per_call, self.steps_per_call = tokens_per_call, steps_per_call

    def one(self):
        self.calls(1)


def loop_variant(variant, model, batches, args) -> Run:
    """``loop``, ``loop_step`` or ``loop_eager_loss`` (the module docstring)."""
    device, counter = args.device, [0]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision != "32")
    if variant == "loop_step":  # AdamW's default implementation, compiled with the step
        opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay,
                                fused=device == "cuda", foreach=device != "cuda")
    if variant == "loop_eager_loss":
        forward = torch.compile(model, backend=backend())
        loss_of = lambda ids: lm_loss(forward(ids), ids)  # noqa: E731
    else:
        if variant == "loop_regional":  # as torchtitan's apply_compile writes it
            for block in blocks_of(model):
                block.compile(backend=backend())
        loss_of = LossInside(model)
        if variant == "loop":
            loss_of = torch.compile(loss_of, backend=backend())

    def step(ids):
        with autocast:
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if variant == "loop_step":
        step = torch.compile(step, backend=backend())

    def calls(n):
        for _ in range(n):
            step(batches[counter[0] % len(batches)])
            counter[0] += 1

    return Run(calls, lambda: model, args.batch * args.seq)


def blocks_of(model) -> list:
    """The model's repeated blocks, as ``fx.regional(state)`` finds them (``blocks="auto"``:
    transformers' ``_no_split_modules``, else the children of an ``nn.ModuleList`` of one
    class), so that the recipe and fx_regional compile the same blocks."""
    from fxtrain.step._regions import resolve
    return [model.get_submodule(name) for name in resolve(model, "auto")]


def one_rank_group(device: str) -> None:
    """A process group of this process alone (fx_shard's world), once per process."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    store = Path(tempfile.mkdtemp(prefix="fxtrain-gpu-kit-")) / "store"
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"file://{store}", rank=0, world_size=1)


class Cycle:
    """``batches`` in turn, ``n`` of them (fit's data)."""

    def __init__(self, batches, n=10**9):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def loss_of(variant: str, model, args):
    """The step's ``loss_fn``: the next-token loss of the logits, or (a ``CHUNKED`` variant)
    ``fx.losses.chunked_causal_lm`` of the final hidden states and the head's weight (tied:
    the token embedding's) with the variant's ``impl``, ``--chunk`` tokens at a time. Both take
    position t's target to be token t + 1 and average over the batch's B x (T - 1) targets."""
    import fxtrain as fx
    if variant not in CHUNKED:
        return lambda s, p, ids: lm_loss(s.apply(p, ids), ids)
    head, impl = head_weight(model), IMPL[variant]

    def chunked(s, p, ids):
        hidden = s.apply(p, ids, head=False)
        return fx.losses.chunked_causal_lm(hidden, p[head], ids, chunk_size=args.chunk,
                                           impl=impl)

    return chunked


def train_step_of(variant, model, args):
    """``(state, train_step, k)``: the fx variant's initial state and its step of ``k`` steps
    per call, not compiled yet."""
    import fxtrain as fx
    if variant in REMAT:
        use_remat(model, fx.remat)
    k = args.k if variant == "fx_k" else 1
    tx = fx.optim.adamw(args.lr, weight_decay=args.weight_decay)
    state = fx.TrainState.create(model, tx, seed=0)
    autodiff = "autograd" if variant in AUTOGRAD else "func"
    if variant == "fx_regional":
        state, autodiff = fx.regional(state), "auto"
    elif variant == "fx_shard":
        one_rank_group(args.device)
        state, autodiff = fx.shard(state, units="auto"), "auto"
    return state, fx.make_train_step(
        loss_of(variant, model, args), precision=step_precision(args, variant),
        steps_per_call=k, autodiff=autodiff), k


def fx_variant(variant, model, batches, args) -> Run:
    """fx.fit over a compiled fx step; each call is one fit call."""

    import fxtrain as fx
    state, train_step, k = train_step_of(variant, model, args)
    if variant not in EAGER:
        train_step = torch.compile(train_step, fullgraph=True, backend=backend())
    if variant == "fx_graphed":
        train_step = fx.cuda_graphed(train_step)
    data, holder = Cycle(batches), [state]

    def calls(n):
        start = holder[0].replace(data=None)
        holder[0] = fx.fit(start, train_step, data, max_steps=int(start.step) + n * k,
                           progress=False)

    return Run(calls, lambda: fx.trained_module(holder[0]), k * args.batch * args.seq, k)


def run_of(variant, model, batches, args) -> Run:
    build = loop_variant if variant in LOOPS else fx_variant
    return build(variant, model, batches, args)


def loss_kernel(variant: str, args) -> str | None:
    """Which kernel a chunked variant's loss runs: ``chunked`` or ``liger``."""
    if variant not in CHUNKED:
        return None
    from fxtrain.losses._fused import chosen
    return chosen(IMPL[variant], args.device)


def child(variant: str, args) -> dict:
    """Trains ``variant`` in this process: its row (or ``{"oom": batch}``)."""
    device = args.device
    torch._dynamo.reset()  # a --tiny run's later variants run in one process
    torch._dynamo.utils.counters.clear()
    try:
        if variant == "hf_trainer" and args.precision == FP8:
            return {"variant": variant, "skipped": "transformers' Trainer takes no fp8 policy"}
        model = model_for(variant, args)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, args)
        batches = batches_of(args, device)
        if variant == "hf_trainer":
            return {**trainer_row(model, batches, args), "params": n_params,
                    "flops_per_token": flops}
        kernel = loss_kernel(variant, args)
        run = run_of(variant, model, batches, args)
        del model  # fx's state holds the weights
        start = time.perf_counter()
        run.one()  # compiles
        sync(device)
        first_s = time.perf_counter() - start
        run.calls(args.warmup - 1)
        sync(device)
        warm_s, warm_peak = time.perf_counter() - start, peak(device)
        restart_peak(device)
        start = time.perf_counter()
        run.calls(args.steps)
        sync(device)
        seconds = time.perf_counter() - start
        step_peak = peak(device)
        kernels = profiled(run.one, device)
    except torch.cuda.OutOfMemoryError:
        return {"variant": variant, "oom": args.batch}
    counters = torch._dynamo.utils.counters
    return {"variant": variant, "precision": args.precision, "params": n_params,
            "flops_per_token": flops, "batch": args.batch,
            "tokens_per_s": args.steps * run.tokens_per_call / seconds,
            "first_step_s": first_s, "warmup_s": warm_s, "attention": kernels,
            "peak_bytes": max(warm_peak, step_peak), "step_peak_bytes": step_peak,
            "loss_kernel": kernel, "graphs": counters["stats"]["unique_graphs"],
            "inductor_cache": {k: counters["inductor"][f"fxgraph_cache_{k}"]
                               for k in ("hit", "miss")}}


def trained_loss(variant: str, args, steps: int) -> float:
    """The float32 loss, on a batch no variant trains on, of the weights ``variant`` reaches
    after ``steps`` steps from the common initial weights on the common batches (in this
    process; ``steps`` a multiple of fx_k's ``--k``)."""
    torch._dynamo.reset()
    model = model_for(variant, args)
    batches = batches_of(args, args.device)
    if variant == "hf_trainer":
        trainer_run(model, batches, args, steps)
        trained = model
    else:
        run = run_of(variant, model, batches, args)
        assert steps % run.steps_per_call == 0, (variant, steps, run.steps_per_call)
        run.calls(steps // run.steps_per_call)
        trained = run.trained()
    held_out = batches_of(args, args.device, n=1, seed=1)[0]
    with torch.no_grad():
        return float(lm_loss(trained(held_out).float(), held_out))


# -- transformers' Trainer ---------------------------------------------------------------------


def trainer_run(model, batches, args, steps: int, callbacks=()):
    """transformers.Trainer over ``model`` (transformers' own module, or nanogpt's through
    ``WithLoss``) for ``steps`` steps: the batches in order (an iterable dataset, which the
    Trainer does not shuffle), the loop's AdamW on every parameter (the Trainer's own would skip
    biases and norms), a constant learning rate, no clipping."""
    from transformers import Trainer, TrainingArguments

    from gpu_models import CausalLM
    from nanogpt import WithLoss
    device = args.device
    rows = [{"input_ids": ids, "labels": ids} for b in batches for ids in b.cpu()]
    data = Rows([rows[i % len(rows)] for i in range(steps * args.batch)])
    trained = model.lm if isinstance(model, CausalLM) else WithLoss(model)
    opt = torch.optim.AdamW(trained.parameters(), args.lr, weight_decay=args.weight_decay,
                            fused=device == "cuda", foreach=device != "cuda")
    with tempfile.TemporaryDirectory() as folder:
        targs = TrainingArguments(
            output_dir=folder, per_device_train_batch_size=args.batch, max_steps=steps,
            learning_rate=args.lr, weight_decay=args.weight_decay,
            lr_scheduler_type="constant", max_grad_norm=0.0, bf16=args.precision != "32",
            torch_compile=True, torch_compile_backend=backend(), use_cpu=device == "cpu",
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=trained, args=targs, train_dataset=data,
                          optimizers=(opt, None), callbacks=list(callbacks))
        trainer.train()


def trainer_row(model, batches, args) -> dict:
    """``trainer_run`` for the warm-up and timed steps, timed by a callback from the first
    step after the warm-up to the end of training."""
    from transformers import TrainerCallback
    device, marks = args.device, {}

    class Clock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == 1:
                sync(device)
                marks["first"] = time.perf_counter() - marks["start"]
            if state.global_step == args.warmup:
                sync(device)
                restart_peak(device)
                marks["timed"] = time.perf_counter()

        def on_train_end(self, targs, state, control, **kwargs):
            sync(device)
            marks["end"] = time.perf_counter()

    marks["start"] = time.perf_counter()
    try:
        trainer_run(model, batches, args, args.warmup + args.steps, [Clock()])
    except torch.cuda.OutOfMemoryError:
        return {"variant": "hf_trainer", "oom": args.batch}
    seconds = marks["end"] - marks["timed"]
    return {"variant": "hf_trainer", "batch": args.batch,
            "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "first_step_s": marks["first"], "warmup_s": marks["timed"] - marks["start"],
            "attention": "not profiled", "peak_bytes": peak(device),
            "step_peak_bytes": peak(device)}


class Rows(torch.utils.data.IterableDataset):
    """The Trainer's rows, in order."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


# -- the batch that fits -----------------------------------------------------------------------


def probe(args) -> dict:
    """Peak memory of the ``loop`` baseline's steps (the loss inside the compiled module, fused
    AdamW; the batch dimension dynamic where the model lets it be, so one compile serves both)
    at batch 2 and at batch 4, two steps each: the bytes a sequence adds and what the run
    holds whatever the batch."""
    device = args.device
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = model_for("loop", args)
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay,
                            fused=True)
    forward = torch.compile(LossInside(model), backend=backend())
    peaks = []
    for batch in (2, 4):
        ids = torch.randint(0, vocab(args), (batch, args.seq), device=device)
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        restart_peak(device)
        for _ in range(2):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision != "32"):
                loss = forward(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks.append(peak(device))
    per_sequence = (peaks[1] - peaks[0]) / 2
    return {"per_sequence": per_sequence, "fixed": peaks[0] - 2 * per_sequence,
            "total": device_memory(device),
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def largest_batch(found: dict, fraction: float = 0.8) -> int:
    """The largest batch whose ``loop`` peak stays within ``fraction`` of the device's memory
    (a multiple of 4 from 16 up; 1 where not even that fits): the other variants keep
    headroom."""
    room = fraction * found["total"] - found["fixed"]
    batch = int(room // max(found["per_sequence"], 1))
    return max(4 * (batch // 4) if batch >= 16 else batch, 1)


def unfitting_batch(found: dict) -> int:
    """The smallest batch the probe says the ``loop`` cannot hold in the device's memory."""
    return int((found["total"] - found["fixed"]) // max(found["per_sequence"], 1)) + 1


def probed(args, argv: list[str]) -> dict:
    """``probe`` in a fresh process, or its answer from an earlier stage on this machine (the
    same model, sequence, precision, dropout, device and torch), kept in
    ``$FXTRAIN_GPU_CACHE``."""
    env = environment(args)
    key = "-".join(str(x) for x in (args.model, args.seq, args.precision, args.dropout[0],
                                    env["device"], env["torch"], args.tiny))
    folder = Path(os.environ.get("FXTRAIN_GPU_CACHE",
                                 Path(tempfile.gettempdir()) / "fxtrain-gpu-cache"))
    path = folder / f"probe-{''.join(c if c.isalnum() or c in '.-' else '_' for c in key)}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": str(path)}
    found = run_child("probe", argv, fresh=True)
    if "error" not in found:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found) + "\n")
    return found


# -- the demo ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DEMO_TINY = ("--steps", "4", "--eval-every", "2", "--no-compile")  # the CPU smoke run's


def demo(args) -> dict:
    """``fxtrain demo --model <args.demo> --no-progress``, its default flags (``--tiny``: 4
    eager steps), in a process and workdir of its own: its figures
    (``gpu_report.demo_figures``), its target from docs/demo.md and the verdict."""
    flags = ["--model", args.demo, "--no-progress", *(DEMO_TINY if args.tiny else ())]
    with tempfile.TemporaryDirectory(prefix="fxtrain-gpu-demo-") as folder:
        start = time.perf_counter()
        text, code, stopped = demo_process([*flags, "--workdir", "run"], folder,
                                           args.demo_timeout)
        seconds = time.perf_counter() - start
        jsonl = Path(folder, "run", "metrics.jsonl")
        row = demo_figures(text, jsonl.read_text() if jsonl.exists() else "")
    row.update(model=args.demo, exit=code, seconds=seconds, timed_out=stopped)
    target = demo_target((ROOT / "docs" / "demo.md").read_text(), args.demo)
    return {"environment": environment(args), "command": "fxtrain demo " + " ".join(flags),
            "timeout": args.demo_timeout, "tiny": args.tiny, "row": row, "target": target,
            "targets": [demo_verdict(row, target)]}


def demo_process(flags: list[str], cwd: str, timeout: float) -> tuple[str, int, bool]:
    """``python -m fxtrain demo FLAGS`` in ``cwd`` (so the fxtrain on the path runs: the kit's
    installed copy, not this tree), its output printed as it comes; returns the output, the
    exit status and whether ``timeout`` stopped it (Ctrl-C: fit saves and the demo says where;
    killed a minute later if still running)."""
    proc = subprocess.Popen([sys.executable, "-m", "fxtrain", "demo", *flags], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    stopped = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join()
    return "".join(lines), proc.returncode, stopped


# -- the parent -------------------------------------------------------------------------------


def run_child(what: str, argv: list[str], fresh: bool) -> dict:
    """``child`` (or ``probe``) in a fresh process, so each peak is its own and each compile is
    cold but for Inductor's on-disk cache; a failure is a row with its error, not the end."""
    if not fresh:
        return main(["--child", what, *argv])
    out = subprocess.run([sys.executable, __file__, "--child", what, *argv],
                         capture_output=True, text=True)
    if out.returncode:
        return {"variant": what, "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment(args) -> dict:
    import importlib.metadata as metadata

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": args.device, "cpu_threads": torch.get_num_threads()}
    for name in ("transformers", "liger_kernel", "torchao"):
        try:
            env[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory
                   / 2**30, cuda=torch.version.cuda, sdpa_flash=torch.backends.cuda
                   .flash_sdp_enabled())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (no nvidia-smi)"
    return env


def variants_here(args) -> list[str]:
    return [v for v in args.variants if args.device == "cuda" or v not in GPU_ONLY]


def rows_to_run(args) -> list[tuple[str, str]]:
    """``(row, precision)`` in order: each variant at ``--precision``, then, for one of
    ``--fp8-variants``, the same in fp8 (the row ``<variant>:fp8``, its ratio to the one
    before)."""
    out = []
    for variant in variants_here(args):
        out.append((variant, args.precision))
        if variant in getattr(args, "fp8_variants", ()):
            out.append((f"{variant}:{FP8}", FP8))
    return out


def measure_dropout(args, argv: list[str], saved=lambda rows: None) -> dict:
    """Every row of ``rows_to_run`` at ``args.dropout[0]`` for ``args.rounds`` rounds (the order
    rotated per round), ``args.big_variants`` at ``args.big_batch``; a variant out of memory is
    run again at half the batch, twice at most; a row whose precision cannot run here
    (``missing``) says why. ``saved`` gets the rows so far after each run (a stage cut off by
    its time limit keeps them)."""
    order, runs = rows_to_run(args), {}
    big = set(getattr(args, "big_variants", None) or ())
    argv = without(argv, "--fp8-variants")  # a child runs one row at one precision
    for r in range(args.rounds):
        for i, (name, precision) in enumerate(order[r % len(order):] + order[:r % len(order)]):
            variant = name.partition(":")[0]
            first = args.big_batch if variant in big else args.batch
            batch = int(runs.get(name, [{}])[-1].get("batch", first))
            also = [] if precision == args.precision else ["--precision", precision]
            row = {"variant": name, "precision": precision, "skipped": missing(precision)}
            for _ in range(3 if row["skipped"] is None else 0):
                fresh = not args.tiny or (r, i) == (0, 0)
                row = run_child(variant, [*argv, "--batch", str(batch), *also], fresh)
                if "oom" not in row or batch == 1:
                    break
                print(f"{name}: out of memory at batch {batch}", file=sys.stderr, flush=True)
                batch = max(batch // 2, 1)
            runs.setdefault(name, []).append(row)
            print(f"  dropout {args.dropout[0]} round {r} {name}: " + summary(row),
                  file=sys.stderr, flush=True)
            saved({v: combined(rows) for v, rows in runs.items()})
    return {v: combined(rows) for v, rows in runs.items()}


def combined(rows: list[dict]) -> dict:
    """One variant's rounds: the first round's row (cold compile) with the median tokens/s."""
    good = [r for r in rows if "tokens_per_s" in r]
    if not good:
        return rows[-1]
    return {**good[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in good),
            "rounds": [r["tokens_per_s"] for r in good]}


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    parser.add_argument("--batch", default="auto", help="sequences per step, or auto")
    parser.add_argument("--big-variants", nargs="+", default=[], choices=VARIANTS,
                        help="variants run at --big-batch")
    parser.add_argument("--big-batch", default="auto",
                        help="auto: the smallest batch the probe says the loop cannot fit")
    parser.add_argument("--seq", type=int, default=None, help="1024 (2048 for llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="calls before the timed ones")
    parser.add_argument("--k", type=int, default=4, help="fx_k's steps per call")
    parser.add_argument("--chunk", type=int, default=16384,
                        help="the chunked variants' tokens per chunk of the loss")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed", FP8])
    parser.add_argument("--fp8-variants", nargs="+", default=[], choices=VARIANTS,
                        help="those of --variants run again in fp8: rows <variant>:fp8")
    parser.add_argument("--demo", default=None, choices=["transformer"],
                        help="run `fxtrain demo --model DEMO` to its target instead")
    parser.add_argument("--demo-timeout", type=float, default=240.0,
                        help="seconds before the demo is stopped (Ctrl-C) and the row says so")
    parser.add_argument("--device", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke size (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="also write the record here")
    parser.add_argument("--md", type=Path, default=None,
                        help="also write the run as a section for benchmarks/gpu/RESULTS.md")
    parser.add_argument("--title", default=None, help="the section's title")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = list(VARIANTS)
    if args.seq is None:
        args.seq = 2048 if args.model == "llama" else 1024
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        use_smoke_backend()
        args.seq, args.steps, args.warmup = min(args.seq, 64), min(args.steps, 3), 3
        args.k, args.chunk = min(args.k, 2), min(args.chunk, 64)
    if args.batch == "auto" and (args.tiny or args.device != "cuda"):
        args.batch = "4"
    if args.warmup < 3:
        parser.error("--warmup must be at least 3 (fx_graphed captures on its third call)")
    check_fp8(parser, args)
    return args


def check_fp8(parser, args) -> None:
    """``--fp8-variants`` with ``--precision`` not fp8 already; the Trainer's fp8 is not wired
    (``child`` says so under ``--precision fp8``). Those not among ``--variants`` do not run
    (a later ``--variants`` that finishes a stage keeps the stage's)."""
    if args.fp8_variants and args.precision == FP8:
        parser.error("--fp8-variants: every variant already runs in fp8 (--precision fp8)")
    if "hf_trainer" in args.fp8_variants:
        parser.error("--fp8-variants hf_trainer: transformers' Trainer takes no fp8 policy here")


def measure(args, argv: list[str], written=lambda record: None) -> dict:
    """Every dropout's runs; ``written(record)`` after each variant."""
    if missing(args.precision):
        raise SystemExit(f"--precision {args.precision}: {missing(args.precision)} (a stage's "
                         f"--fp8-variants rows say so and the others run)")
    start = time.perf_counter()
    record = {"environment": environment(args), "model": args.model, "seq": args.seq,
              "chunk": args.chunk, "precision": args.precision, "lr": args.lr,
              "weight_decay": args.weight_decay, "steps": args.steps, "warmup": args.warmup,
              "fp8_variants": args.fp8_variants, "argv": argv, "dropouts": {}}
    found = None
    if args.batch == "auto":
        found = probed(args, argv)
        if "error" in found:
            raise SystemExit(f"the batch probe failed:\n{found['error']}")
        args.batch = str(largest_batch(found))
        record["probe"] = found
        print(f"batch {args.batch} (probe: {found['per_sequence'] / 2**20:.0f} MiB a sequence, "
              f"{found['fixed'] / 2**30:.2f} GiB fixed)", file=sys.stderr, flush=True)
    record["batch"] = int(args.batch)
    if args.big_variants:
        record["big_variants"] = args.big_variants
        if args.big_batch == "auto" and found:
            args.big_batch = unfitting_batch(found)
            need = found["fixed"] + args.big_batch * found["per_sequence"]
            record["big_why"] = (f"the smallest the probe says the loop cannot hold "
                                 f"({need / 2**30:.1f} GiB of {found['total'] / 2**30:.1f})")
        elif args.big_batch == "auto":
            args.big_batch, record["big_why"] = 2 * int(args.batch), "twice the batch"
        record["big_batch"] = args.big_batch = int(args.big_batch)
    peak_tf = peak_tflops(args, record["environment"]["device"])
    record["peak_tflops"] = peak_tf
    for dropout in args.dropout:
        one = argparse.Namespace(**{**vars(args), "dropout": [dropout]})

        def saved(rows, key=str(dropout)):
            ratios(rows, peak_tf)
            record["dropouts"][key] = rows
            record["targets"] = targets(record)
            record["against_full_logits"] = against_full_logits(record, CHUNKED)
            record["against_precision"] = against_precision(record)
            record["against_anchor"] = against_anchor(record)
            written(record)

        saved(measure_dropout(one, without(argv, "--dropout", "--batch", "--big-batch") + [
            "--dropout", str(dropout)], saved))
    record["seconds"] = time.perf_counter() - start
    return record


def without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less ``options`` and the values that follow each."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in options
        if not skipping:
            out.append(a)
    return out


def writer(args, argv: list[str]):
    """``written(record)``: the record to ``--out`` as JSON and to ``--md`` as a section, the
    command and commit from ``$FXTRAIN_GPU_COMMAND`` and ``$FXTRAIN_GPU_COMMIT`` (scripts/gpu.sh
    sets them) or this process's."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = os.environ.get("FXTRAIN_GPU_COMMAND") or \
        "python benchmarks/gpu_transformer.py " + " ".join(argv)
    commit = os.environ.get("FXTRAIN_GPU_COMMIT") or _commit()
    title = args.title or (f"`fxtrain demo --model {args.demo}`" if args.demo else
                           f"`--model {args.model}`, {' '.join(args.variants)}")
    text = demo_section if args.demo else section

    def written(record):
        if args.out:
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        if args.md:
            args.md.write_text(text(record, title, command, commit, date))

    return written


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip() \
            or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        what, args = argv[1], arguments(argv[2:])
        if what == "probe":
            return probe(args)
        args.batch = int(args.batch)
        return child(what, args)
    args = arguments(argv)
    written = writer(args, argv)
    if args.demo:
        record = demo(args)
        print(*record["targets"], sep="\n")
        written(record)
        return record
    record = measure(args, argv, written)
    print(markdown(record))
    for line in (record["targets"] + record["against_full_logits"] + record["against_precision"]
                 + record["against_anchor"]):
        print(line)
    print(f"{record['seconds']:.0f} s", flush=True)
    written(record)
    return record


if __name__ == "__main__":
    result = main()
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(result))
