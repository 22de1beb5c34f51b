"""Each rank's peak resident memory while a Hugging Face folder is loaded into a sharded state:
``fx.from_pretrained`` (each rank reads its slices) against the whole-model path
(transformers' ``from_pretrained``, ``TrainState.create``, ``fx.shard``: the whole model built
in every process first), on ``--world`` gloo ranks (issue 78's measure).

A Llama-shaped folder of ``--hidden``/``--intermediate``/``--layers``/``--vocab`` (float32,
untied, several files with an index) is saved once by this process. Each path then runs in a
fresh set of processes, one torch thread each, started with ``MALLOC_MMAP_THRESHOLD_=131072``
(every tensor above 128 KiB its own mapping, gone from the resident set when freed: what is
measured is what is held, not what glibc keeps; ``benchmarks/resident.py`` shows the
difference). A thread samples ``RssAnon`` (``/proc/self/status``) every millisecond during the
load: anonymous pages only, because safetensors maps its files and their page cache is
counted in ``VmRSS`` while mapped, but is the kernel's to drop, not the process's.

Per rank, in MiB: the peak over the baseline taken just before the load (after torch,
transformers, its Llama module and the process group are up), what the loaded state holds on the rank (its
parameters', buffers' and optimizer state's local bytes), the largest tensor of the folder,
and the peak less those two: the overhead, which ``--bound`` (default 16 MiB) must cover for
fx.from_pretrained (checked, exit 1 if not). The ratio is the whole-model path's peak to
fx.from_pretrained's, on the same ranks in the same run.

Run: python benchmarks/load_pretrained.py [--world 2] [--layers 6] [--hidden 768]
     [--intermediate 2048] [--vocab 16000] [--optimizer sgd|adamw] [--layout units|whole|tp]
     [--smoke] [--out P: P.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from resident import _status  # the benchmarks import each other by name

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
LAYOUTS = {"units": {}, "whole": {"units": "whole"}, "tp": {"tp_plan": "auto"}}


class AnonPeak:
    """The highest ``RssAnon`` sampled every ``interval`` seconds on a thread of its own
    while the block runs (and at its start and end)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self.peak = _status("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def llama_config(args):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2, max_position_embeddings=128, use_cache=False,
        tie_word_embeddings=False)


def save_folder(args, folder: str) -> None:
    """The model of ``args`` saved into ``folder`` (in files of at most 64 MB, an index)."""
    import torch
    import transformers
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(args)).save_pretrained(folder,
                                                                      max_shard_size="64MB")


def largest_tensor(folder: str) -> int:
    """The bytes of the folder's largest tensor, from its headers."""
    from fxtrain.apps import _hf_folder
    import torch
    entries = _hf_folder.read(folder).entries.values()
    return max(torch.Size(e.shape).numel() * torch.empty((), dtype=e.dtype).element_size()
               for e in entries)


def loaded(path: str, folder: str, optimizer: str, layout: str):
    """The state of ``folder`` loaded by ``path`` ("fx": fx.from_pretrained; "whole":
    transformers' from_pretrained, TrainState.create, fx.shard)."""
    import fxtrain as fx
    tx = fx.optim.sgd(0.1) if optimizer == "sgd" else fx.optim.adamw(1e-4)
    how = LAYOUTS[layout]
    if path == "fx":
        return fx.from_pretrained(folder, tx, **how)
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    state = fx.TrainState.create(model, tx)
    del model
    return fx.shard(state, **how)


def measure(path: str, folder: str, optimizer: str = "sgd", layout: str = "units") -> dict:
    """This rank's peak ``RssAnon`` over its baseline while ``path`` loads ``folder``, and
    what the state it loaded holds here (bytes)."""
    import gc

    import fxtrain as fx
    import torch
    import transformers
    transformers.LlamaForCausalLM  # its module (imported lazily), by both paths: before the baseline
    gc.collect()
    fx.distributed.barrier()
    base = _status("RssAnon")
    with AnonPeak() as sampler:
        state = loaded(path, folder, optimizer, layout)
    held = fx.sharding.local_nbytes((state.params, state.buffers, state.opt_state))
    whole = sum(p.numel() * p.element_size() for p in state.params.values())
    del state
    return {"peak": sampler.peak - base, "held": held, "params": whole}


def _rank(rank: int, world: int, port: int, path: str, folder: str, optimizer: str,
          layout: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    import fxtrain as fx
    torch.set_num_threads(1)
    fx.distributed.init()
    try:
        row = measure(path, folder, optimizer, layout)
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(path: str, folder: str, world: int, optimizer: str, layout: str) -> list[dict]:
    """``path``'s load on ``world`` fresh processes started under ``MALLOC``: every rank's
    row."""
    import torch.multiprocessing as mp
    saved = dict(os.environ)
    os.environ.update(MALLOC)  # read by glibc when each process starts
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_rank, args=(world, _port(), path, folder, optimizer, layout, out),
                     nprocs=world)
            return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/model"
        save_folder(args, folder)
        largest = largest_tensor(folder)
        rows = {path: job(path, folder, args.world, args.optimizer, args.layout)
                for path in ("fx", "whole")}
    for path, ranks in rows.items():
        for r in ranks:
            r["overhead"] = r["peak"] - r["held"] - largest
    worst = {path: max(ranks, key=lambda r: r["peak"]) for path, ranks in rows.items()}
    return {"argv": sys.argv[1:], "world": args.world, "largest": largest, "ranks": rows,
            "params": rows["fx"][0]["params"], "bound": args.bound * 2**20,
            "ratio": worst["whole"]["peak"] / worst["fx"]["peak"],
            "within": all(r["overhead"] <= args.bound * 2**20 for r in rows["fx"])}


def report(result: dict) -> str:
    mib = 2**20
    lines = [f"fx.from_pretrained against the whole-model path, {result['world']} gloo ranks, "
             f"a {result['params'] / mib:.0f} MiB model, largest tensor "
             f"{result['largest'] / mib:.1f} MiB (MiB of RssAnon over the baseline, per rank)",
             "| path | rank | peak | held | peak - held - largest |", "|---|---|---|---|---|"]
    for path, ranks in result["ranks"].items():
        for i, r in enumerate(ranks):
            lines.append(f"| {path} | {i} | {r['peak'] / mib:.1f} | {r['held'] / mib:.1f} | "
                         f"{r['overhead'] / mib:.1f} |")
    lines.append(f"whole / fx peak: {result['ratio']:.2f}x; fx within held + largest + "
                 f"{result['bound'] / mib:.0f} MiB: {result['within']}")
    return "\n".join(lines)


def model_arguments(description: str) -> argparse.ArgumentParser:
    """A parser of the ranks and the Llama's sizes (``llama_config``), with the defaults of
    the figures in docs/distributed.md, and ``--smoke``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--smoke", action="store_true", help="a small model (CI's tools test)")
    p.add_argument("--out")
    return p


def _arguments(argv) -> argparse.Namespace:
    p = model_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="units")
    p.add_argument("--bound", type=float, default=16.0, help="the overhead allowed, MiB")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.vocab, args.heads = 2, 256, 512, \
            4000, 4
    return args


def main(argv=None) -> int:
    args = _arguments(argv)
    result = run(args)
    print(report(result))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    return 0 if result["within"] else 1


if __name__ == "__main__":
    sys.exit(main())
