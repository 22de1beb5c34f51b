"""The load, simulated: what one rank of a job of 8 or 64 holds while ``fx.from_pretrained``
loads a Llama-3-8B- or 70B-shaped folder, with and without the optimizer state offloaded.

One process plays rank 0 as ``simulate.py`` does: torch's fake process group stands in for
the others and the state lives on fake tensors (``FakeTensorMode``). The folder is real and
written on disk, but sparse: ``config.json``, an index and safetensors files with real headers
(every tensor of the model, bfloat16 as the hub holds Llama 3), whose data regions are holes
(``truncate``), so a 141 GB folder takes a few kilobytes. ``fx.from_pretrained`` runs its own
code on it: the headers and the index read and checked, the skeleton on the meta device, the
names and shapes matched, ``fx.shard``'s layout. Two hooks stand in for the other ranks: the
agreement of errors (an all-gather of objects, which a fake group cannot carry) runs alone,
and each slice is an empty tensor of the shape this rank would read (safetensors would read
zeros from the holes).

Per run, this rank's bytes (every figure a sum of the storages the simulated rank holds,
counted by ``simulate.Tracker``): the parameters, buffers and optimizer state it holds after
the load; the load's peak (all of them, and the slice being read); the largest slice. On a
GPU the slices are read into host memory and copied to the device one at a time, so the
device holds the parameters, buffers and (without offload) the optimizer state, and the host
the slice being read and (with offload) the optimizer state: the last two columns.
``tests/ranks/test_simulate_load.py`` checks that a small model's simulated figures equal what
real gloo ranks hold after the same load.

Run: python benchmarks/simulate_load.py [--runs llama3-8b:8 ...] [--smoke] [--out P]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from simulate import MODELS, Tracker, _gib, _nbytes, _storages  # the benchmarks import each other

RUNS = (("llama3-8b", 8), ("llama3-8b", 64), ("llama3-70b", 8), ("llama3-70b", 64))
FILE_BYTES = 5 * 10**9  # as the hub splits Llama 3's weights
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def config(model: str, dtype: torch.dtype = torch.bfloat16):
    import transformers
    return transformers.LlamaConfig(**MODELS[model], max_position_embeddings=8192,
                                    use_cache=False, tie_word_embeddings=False,
                                    torch_dtype=dtype, architectures=["LlamaForCausalLM"])


def sparse_folder(model: str, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                  file_bytes: int = FILE_BYTES) -> int:
    """``model``'s folder in ``folder``: its config, an index and safetensors files of at most
    ``file_bytes`` of data each, with real headers and data regions left as holes. Returns the
    bytes the files say they hold."""
    import transformers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(model, dtype)
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  transformers.LlamaForCausalLM(cfg).state_dict().items()}
    size = torch.empty((), dtype=dtype).element_size()
    files, current, used = [], {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        if current and used + nbytes > file_bytes:
            files.append(current)
            current, used = {}, 0
        current[name] = (shape, used, used + nbytes)
        used += nbytes
    files.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        header = {name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [begin, end]}
                  for name, (shape, begin, end) in tensors.items()}
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        data = max(end for _, _, end in tensors.values())
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + data)  # the data: a hole
        weight_map.update(dict.fromkeys(tensors, fname))
        total += data
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


class LoadTracker(Tracker):
    """``simulate.Tracker`` of the simulated rank's data: the fake tensors of its own fake mode
    (``mode``, set by ``simulated_reads``), made from the slices it reads. Not the skeleton's
    tensors: its parameters are meta, and ``torch.empty`` made each first on the CPU (as
    accelerate's ``init_empty_weights`` does), never touched, so never resident (the
    measured ``load_pretrained.py`` shows it); nor DTensor's own fake tensors of global shapes,
    which its sharding propagation makes to read shapes from."""

    mode = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local ops through us
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if getattr(t, "fake_mode", None) is self.mode is not None:
                self.hold(t.untyped_storage())
        self.peak = max(self.peak, self.now)
        return out


@contextlib.contextmanager
def simulated_reads(slices: list[int], tracker: LoadTracker):
    """``fx.from_pretrained`` as one rank of a fake group: errors agreed alone, and each slice
    an empty fake tensor of the shape this rank reads (its bytes appended to ``slices``, its
    storage held by ``tracker``); what is made from the slices (the shards, the optimizer
    state) is fake in turn."""
    from torch._subclasses import fake_tensor

    from fxtrain.apps import _from_pretrained as loader
    agree, value = loader._agree, loader._value
    mode = tracker.mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)

    def empty_slice(f, name, box, like, dtype):
        shape = like.to_local().shape if box is not None else like.shape
        with mode:
            t = torch.empty(shape, dtype=dtype)
        slices.append(t.nbytes)
        tracker.hold(t.untyped_storage())
        tracker.peak = max(tracker.peak, tracker.now)
        return t

    loader._agree, loader._value = (lambda run: run()), empty_slice
    try:
        yield
    finally:
        loader._agree, loader._value = agree, value


def held(state) -> dict[str, int]:
    """The bytes ``state`` holds on this rank, by part."""
    return {"params": _nbytes(_storages(state.params)),
            "buffers": _nbytes(_storages(state.buffers or {})),
            "opt_state": _nbytes(_storages(state.opt_state))}


def simulate(folder: str, offload: str | None) -> dict:
    """This process's row as rank 0 of the fake group already up: the load of ``folder`` with
    AdamW, per block, ``offload`` as given."""
    import fxtrain as fx
    slices: list[int] = []
    tracker = LoadTracker([])
    with simulated_reads(slices, tracker), tracker:
        state = fx.from_pretrained(folder, fx.optim.adamw(3e-4, weight_decay=0.1),
                                   offload=offload)
        parts = held(state)
    largest = max(slices)
    device = parts["params"] + parts["buffers"] + (0 if offload else parts["opt_state"])
    host = largest + (parts["opt_state"] if offload else 0)
    return {**parts, "peak": tracker.peak, "largest_slice": largest, "device": device,
            "host": host, "offload": offload}


def _run(_: int, model: str, world: int, folder: str, out: str) -> None:
    """A fresh process: rank 0 of a fake group of ``world``, both loads, rows to ``out``."""
    import torch.distributed as dist
    dist.init_process_group("fake", rank=0, world_size=world)
    try:
        rows = [simulate(folder, offload) for offload in (None, "optimizer")]
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(rows))
    sys.stdout.flush()
    os._exit(0)  # as simulate.py's processes: out without the fake group's teardown


def run(model: str, world: int, folder: str) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rows.json"
        mp.start_processes(_run, args=(model, world, folder, out), nprocs=1,
                           start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def markdown(result: dict) -> str:
    lines = ["## The load, simulated (`benchmarks/simulate_load.py`)", "",
             f"Command: `{result['command']}` ({result['minutes']:.1f} min, {result['date']}, "
             f"torch {result['torch']}). Rank 0 of a fake group loads a sparse folder of the "
             "config's shapes in bfloat16 with `fx.from_pretrained`, per block, AdamW (moments in "
             "the parameters' dtype). GiB per rank.", "",
             "| model | ranks | offload | params | optimizer | largest slice | load peak "
             "| device after the load | host peak |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for r in row["loads"]:
            lines.append(
                f"| {row['model']} | {row['world']} | {r['offload'] or 'none'} | "
                f"{_gib(r['params'])} | {_gib(r['opt_state'])} | {_gib(r['largest_slice'])} "
                f"| {_gib(r['peak'])} | {_gib(r['device'])} | {_gib(r['host'])} |")
    return "\n".join(lines) + "\n"


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=[f"{m}:{w}" for m, w in RUNS],
                        help="model:ranks, e.g. llama3-70b:64")
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = ["tiny:2", "tiny:8"]
    args.parsed = []
    for text in args.runs:
        model, _, world = text.partition(":")
        if model not in MODELS or not world.isdigit() or int(world) < 2:
            parser.error(f"--runs takes model:ranks with a model of {', '.join(MODELS)} and at "
                         f"least 2 ranks, got {text!r}")
        args.parsed.append((model, int(world)))
    return args


def main(argv=None) -> dict:
    import tempfile
    args = _arguments(argv)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, world in args.parsed:
            folder = f"{tmp}/{model}"
            if not os.path.isdir(folder):
                sparse_folder(model, folder)
            rows.append({"model": model, "world": world, "loads": run(model, world, folder)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "command": "python benchmarks/simulate_load.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
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
