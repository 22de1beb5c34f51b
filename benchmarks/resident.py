"""The resident set as the operating system counts it, split by who holds it: one process
training an nn.Sequential of ``--blocks`` blocks, each Sequential(Linear(``--width``,
``--width``), ReLU), with AdamW,
against the same model sharded over ``--world`` gloo ranks by fx.shard and by FSDP2 (issue 77's
case: what a user watching ``top`` or a scheduler's memory limit sees).

Each run is a fresh set of processes, one torch thread each, eager, ``--warmup`` steps then
``--steps`` measured ones (fx: the donating step, as ``fx.fit`` runs it, sharded by fx.shard's
default, a unit per block; FSDP2: ``fully_shard`` per block then on the root,
``torch.optim.AdamW(foreach=True)``, ``zero_grad(set_to_none=True)``, as FSDP2's docs write
it). Before the measured steps the peak count restarts (``/proc/self/clear_refs``; the heap is
not trimmed: what glibc kept from the warm-up is resident, as a user's process has it); a
thread samples ``VmRSS`` every millisecond and, at each new maximum, asks glibc where its bytes
are (``malloc_info``), keeping the split only where the resident set moved less than 1 MiB
while glibc answered (training runs on meanwhile). At the highest such sample:

  malloc, main   the main arena (the training thread's tensors and Python's large objects):
                 bytes in use, and bytes free in glibc's bins (freed, kept for reuse; resident
                 unless trimmed, which nothing here does)
  malloc, others the other threads' arenas: gloo's worker threads copy each collective's
                 tensors into buffers of their own, and glibc gives each thread an arena
  mmapped        chunks above the mmap threshold, in use (a freed one leaves the resident set)
  the rest       the resident set less the above: libraries, the interpreter's own arenas

The split is the highest stable sample's; ``peak`` is the kernel's count, which may be a little
higher (``unsampled``: the difference, reported).

The peak resident set is measured at two depths (``--blocks 6 12``) and reported as bytes per
parameter of the whole model (the slope, which cancels the libraries), the median over
``--rounds`` (each a fresh set of processes for every run; what glibc keeps varies from one
process to the next), with the same process under three allocator settings, given to the
processes at their start:

  glibc          glibc's defaults (what a user runs)
  mmap-128k      MALLOC_MMAP_THRESHOLD_=131072: each tensor above 128 KiB its own mapping, gone
                 from the resident set when freed (glibc otherwise raises the threshold to the
                 size of the largest freed mapping, up to 32 MiB, and keeps later tensors of
                 that size in its arenas)
  one-arena      MALLOC_ARENA_MAX=1: gloo's threads allocate from the main arena, so the
                 bytes one frees the other reuses

Run: python benchmarks/resident.py [--rounds 3] [--blocks 6 12] [--world 2] [--width 1024] [--smoke]
     [--out P: P.json and P.md]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_model
from scale import _port

VARIANTS = ("one process", "fx.shard", "FSDP2")
ALLOCATORS = {"glibc": {}, "mmap-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
              "one-arena": {"MALLOC_ARENA_MAX": "1"}}
PARTS = ("main_used", "main_free", "others_used", "others_free", "mmapped", "rest")
LR, WD = 1e-3, 0.1


# -- what glibc holds ------------------------------------------------------------------------


_HEAP = re.compile(r'<heap nr="(\d+)">(.*?)</heap>', re.S)
_TOTAL = re.compile(r'<total type="(fast|rest|mmap)" count="\d+" size="(\d+)"/>')
_SYSTEM = re.compile(r'<system type="current" size="(\d+)"/>')


def malloc_parts() -> dict[str, int]:
    """glibc's bytes by arena (``malloc_info``): the main arena's and the other threads'
    arenas' bytes in use and free-but-kept, and the mmapped chunks in use."""
    libc = ctypes.CDLL(None)
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if libc.malloc_info(0, stream) != 0:
        libc.fclose(stream)
        raise OSError("malloc_info failed: this needs glibc")
    libc.fclose(stream)
    xml = ctypes.string_at(buf, size.value).decode()
    libc.free(buf)
    parts = dict.fromkeys(PARTS[:-1], 0)
    for nr, body in _HEAP.findall(xml):
        free = sum(int(s) for kind, s in _TOTAL.findall(body) if kind in ("fast", "rest"))
        system = int(_SYSTEM.search(body).group(1))
        where = "main" if nr == "0" else "others"
        parts[f"{where}_used"] += system - free
        parts[f"{where}_free"] += free
    tail = xml[xml.rfind("</heap>"):]
    parts["mmapped"] = sum(int(s) for kind, s in _TOTAL.findall(tail) if kind == "mmap")
    return parts


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakSampler:
    """Samples the resident set every ``interval`` seconds on a thread of its own; at each new
    maximum, glibc's split (``malloc_parts``), kept where the resident set moved at most
    ``steady`` bytes while glibc answered. ``peak`` is the kernel's count (``VmHWM``), or
    the highest sample where that is higher (the kernel adds a thread's pages in batches)."""

    def __init__(self, interval: float = 0.001, steady: int = 2**20):
        self.interval, self.steady, self.top, self.parts = interval, steady, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status("VmRSS")
            if rss > self.top:
                parts = malloc_parts()  # the training thread runs on meanwhile (no GIL held)
                after = _status("VmRSS")
                if abs(after - rss) <= self.steady:
                    self.top = rss
                    self.parts = {**parts, "rest": (rss + after) // 2 - sum(parts.values())}
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(_status("VmHWM"), self.top)  # the kernel counts pages in batches


# -- one variant's training ------------------------------------------------------------------


def _model(args):
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(args.width, args.width),
                                                     torch.nn.ReLU())
                                 for _ in range(args.blocks)])


def _batches(args, rank: int):
    import torch
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(args.rows, args.width, generator=g) for _ in range(4)]


def fxtrain(args, sharded: bool):
    """fx's run (sharded by fx.shard's default, or one process): a function of the steps."""
    import fxtrain as fx
    state = fx.TrainState.create(_model(args), fx.optim.adamw(LR, weight_decay=WD))
    state = fx.shard(state) if sharded else state
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    batches, held = _batches(args, fx.distributed.rank()), {"state": state}
    del state

    def train(steps: int) -> None:
        state = held.pop("state")
        for i in range(steps):
            state, _ = step(state, batches[i % len(batches)], donate=True)
        held["state"] = state

    return train


def fsdp2(args):
    """FSDP2's run, as its docs write it: a function of the steps."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = _model(args)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), LR, weight_decay=WD, foreach=True)
    batches = _batches(args, torch.distributed.get_rank())

    def train(steps: int) -> None:
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            model(batches[i % len(batches)]).square().mean().backward()
            opt.step()

    return train


def measure(variant: str, args) -> dict:
    """This process's peak resident set over the measured steps, and glibc's split at it."""
    import gc

    import torch
    torch.set_num_threads(1)
    train = fsdp2(args) if variant == "FSDP2" else fxtrain(args, variant == "fx.shard")
    train(args.warmup)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak count restarts from here
    base = _status("VmRSS")
    with PeakSampler() as sampler:
        train(args.steps)
    return {"peak": sampler.peak, "base": base, "sampled": sampler.top,
            "unsampled": sampler.peak - sampler.top, **sampler.parts}


def _rank(rank: int, world: int, port: int, variant: str, args, out: str) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        import fxtrain as fx
        fx.distributed.init()
    row = measure(variant, args)
    if world > 1:
        import torch
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def job(variant: str, allocator: str, args) -> dict:
    """``variant`` in fresh processes under ``allocator``'s settings: the higher rank's row."""
    import torch.multiprocessing as mp
    world = 1 if variant == "one process" else args.world
    saved = dict(os.environ)
    os.environ.update(ALLOCATORS[allocator])  # read by glibc when each process starts
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_rank, args=(world, _port(), variant, args, out), nprocs=world)
            rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return max(rows, key=lambda r: r["peak"])


def table(args) -> list[dict]:
    """Every variant under every allocator at every depth, the variants alternating."""
    rows, depths = [], args.blocks
    for allocator in args.allocators:
        for blocks in depths:
            for variant in args.variants:
                one = argparse.Namespace(**{**vars(args), "blocks": blocks})
                rows.append({"variant": variant, "allocator": allocator, "blocks": blocks,
                             "params": blocks * (args.width + 1) * args.width,
                             **job(variant, allocator, one)})
                print(f"{allocator:10} {blocks:3} blocks  {variant:12} peak "
                      f"{rows[-1]['peak'] / 2**20:7.1f} MiB", flush=True)
    return rows


def per_parameter(rows: list[dict]) -> dict:
    """Per variant and allocator: the slope of each measure over the depths, bytes per
    parameter of the whole model (the two extreme depths)."""
    out = {}
    for r in rows:
        out.setdefault((r["variant"], r["allocator"]), []).append(r)
    slopes = {}
    for key, runs in out.items():
        lo, hi = min(runs, key=lambda r: r["params"]), max(runs, key=lambda r: r["params"])
        if hi["params"] == lo["params"]:
            continue
        d = hi["params"] - lo["params"]
        slopes[key] = {m: (hi[m] - lo[m]) / d for m in ("peak", *PARTS, "unsampled")}
    return slopes


def medians(rounds: list[dict]) -> dict:
    """Each round's slopes (``per_parameter``) put together: per run, the median of each
    measure over the rounds, the range of the peak's, and of its ratio to one process's in the
    same round."""
    out = {}
    for key in rounds[0]:
        peaks = [r[key]["peak"] for r in rounds]
        one = ("one process", key[1])
        ratios = [r[key]["peak"] / r[one]["peak"] for r in rounds if one in r]
        out[key] = {**{m: statistics.median(r[key][m] for r in rounds) for m in rounds[0][key]},
                    "peak_range": (min(peaks), max(peaks)),
                    "ratio": statistics.median(ratios) if ratios else None,
                    "ratio_range": (min(ratios), max(ratios)) if ratios else None}
    return out


def markdown(result: dict) -> str:
    slopes = {tuple(k.split(" | ")): v for k, v in result["per_parameter"].items()}
    head = ["# The resident set as the operating system counts it", "",
            f"{result['date']}, {result['cpu']}, torch {result['torch']}. "
            f"`python benchmarks/resident.py {' '.join(result['argv'])}`: an nn.Sequential of "
            f"Sequential(Linear({result['width']}, {result['width']}), ReLU) blocks, AdamW, "
            f"eager, {result['world']} gloo ranks against one process. Bytes per parameter of "
            "the whole model (the slope of the peak resident set over the depths), the higher "
            f"rank's, the median of {result['rounds']} rounds (the range in brackets); the "
            "ratio to one process is taken within each round; glibc's split at the peak "
            "sample (the module's docstring).", "",
            "| allocator | run | peak RSS | / one process | main arena, used | main, free in "
            "bins | other arenas, used | others, free in bins | mmapped | rest | unsampled |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, allocator), s in slopes.items():
        lo, hi = s["peak_range"]
        ratio = "-" if s["ratio"] is None else \
            f"{s['ratio']:.2f}x ({s['ratio_range'][0]:.2f}-{s['ratio_range'][1]:.2f})"
        head.append(f"| {allocator} | {variant} | {s['peak']:.1f} ({lo:.1f}-{hi:.1f}) | "
                    f"{ratio} | " + " | ".join(f"{s[p]:.1f}" for p in (*PARTS, "unsampled"))
                    + " |")
    return "\n".join(head) + "\n"


def _arguments(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 12])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                   default=list(ALLOCATORS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every code path once")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.blocks, args.width, args.warmup, args.steps, args.rounds = [2, 3], 64, 1, 2, 1
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = _arguments(argv)
    import torch
    rounds = [table(args) for _ in range(args.rounds)]
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
              "torch": torch.__version__, "argv": argv, "width": args.width,
              "world": args.world, "rounds": args.rounds, "rows": rounds,
              "per_parameter": {" | ".join(k): v for k, v in
                                medians([per_parameter(rows) for rows in rounds]).items()}}
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
