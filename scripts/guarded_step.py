"""The demo transformer's compiled step with every Inductor buffer and every tensor of its state
and batch in memory fenced by guard pages (no access) and filled with NaN (0xFF bytes): a kernel
that reads past a tensor's end (or before its start, ``--side start``) segfaults, and
faulthandler prints the wrapper's line that called it; one that reads an element no kernel
wrote turns the loss or the state NaN, or makes two calls on one state differ.

    python scripts/guarded_step.py                    # bf16-mixed, 1 thread, 3 calls
    python scripts/guarded_step.py --precision 32 --threads 2 --side start

Issue 74 (a compiled bf16-mixed step that went NaN by step 20 and gave two losses for one
state on an AVX-512 BF16 machine): on a 2-core Intel Xeon with AVX-512 BF16 and AMX, torch
2.13.0, 805 fenced tensors, no fault, the same finite loss and state in every call. Run it
with a fresh ``TORCHINDUCTOR_CACHE_DIR`` on a machine where the demo goes NaN.

Reaches one private name, ``torch._C._dynamo.guards._empty_strided_cpu`` (what Inductor's
generated modules bind as their CPU allocator when they are imported; torch 2.13), so it is a
script, not part of fxtrain.
"""

import argparse
import ctypes
import faulthandler
import math
import mmap
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxtrain as fx  # noqa: E402
from fxtrain.apps.demo import data  # noqa: E402
from fxtrain.apps.demo.gpt import GPT  # noqa: E402

PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_KEPT = []  # the mappings stay alive as long as the process


def fenced(size, stride, dtype, side="end"):
    """An empty strided tensor between two PROT_NONE pages, its bytes 0xFF; ``side`` says
    which guard it touches."""
    item = torch.empty((), dtype=dtype).element_size()
    numel = 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0
    nbytes = max(numel, 1) * item
    pages = math.ceil(nbytes / PAGE)
    region = mmap.mmap(-1, (pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    for guard in (base, base + (pages + 1) * PAGE):
        if _LIBC.mprotect(guard, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    start = base + (pages + 1) * PAGE - nbytes if side == "end" else base + PAGE
    ctypes.memset(start, 0xFF, nbytes)
    raw = (ctypes.c_char * nbytes).from_address(start)
    _KEPT.append((region, raw))
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)[:numel]
    return flat.as_strided(size, stride)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", choices=["end", "start"], default="end")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    faulthandler.enable()
    torch.set_num_threads(args.threads)
    guards = torch._C._dynamo.guards
    guards._empty_strided_cpu = lambda size, stride, dtype, *rest: fenced(size, stride, dtype,
                                                                          args.side)

    text = data.stdlib_text()
    codec = data.CharCodec(text)
    ids = codec.encode(text)
    train = fx.data.Batches(data.char_sequences(ids[:int(len(ids) * 0.9)], 64, stride=32),
                            batch_size=args.batch_size, seed=0)
    torch.manual_seed(0)
    model = GPT(len(codec), context=64, width=128, layers=2, heads=4, dropout=0.1)

    def loss_fn(state, params, batch):
        x, y = batch
        logits = state.apply(params, x).float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    tx = fx.optim.chain(fx.optim.clip_by_global_norm(1.0), fx.optim.adamw(3e-3))
    step = torch.compile(fx.make_train_step(loss_fn, precision=args.precision, donate=False,
                                            grad_stats=True), fullgraph=True)
    state = fx.TrainState.create(model, tx, seed=0)
    batch, _, _ = train.next(train.init())
    copy = lambda t: fenced(t.shape, t.contiguous().stride(), t.dtype, args.side).copy_(t)
    state = pytree.tree_map_only(torch.Tensor, copy, state)
    batch = pytree.tree_map_only(torch.Tensor, copy, batch)
    seen = set()
    for call in range(args.calls):
        new, metrics = step(state, batch)
        digest = fx.tree_digest(new)
        seen.add((float(metrics["loss"]), digest))
        print(f"call {call}: loss {float(metrics['loss']):.6f} grad_norm "
              f"{float(metrics['grad_norm']):.6f} state {digest[:16]}", flush=True)
    finite = all(math.isfinite(loss) for loss, _ in seen)
    print(f"{len(_KEPT)} fenced tensors; {'one result' if len(seen) == 1 else 'RESULTS DIFFER'}"
          f", {'finite' if finite else 'NOT FINITE'}")
    return 0 if len(seen) == 1 and finite else 1


if __name__ == "__main__":
    sys.exit(main())
