"""Remat's tolerances and runners (tests/unit/test_remat.py, test_torch_checkpoint.py) and the
memory probes of a compiled step in a fresh process (tests/e2e/test_remat_processes.py,
test_random_ops_processes.py)."""

import fxtrain as fx


# -- test_remat.py's helpers ----------------------------------------------------------------------

LR = 0.1
# Two compiled programs (or compiled against eager) may fuse and order float32 sums
# differently on another CPU. With SGD each step moves a parameter by LR times its gradient, so
# a difference there is LR times the gradients' difference: float32 rounding (eps 1.2e-7) over
# sums of at most 64 terms in 3 blocks, relative to gradients of order 1, is below 1e-4, and 3
# steps of LR 0.1 give at most 3e-5, far below what a wrong mask or a doubled gradient moves
# (of order LR times a gradient, 1e-2). Adam would divide by the gradient's own size and blow
# up a rounding difference in a gradient near zero, so it is not used where paths differ.
ATOL = 3e-5


def run(step, state, batches):
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def same(a, b):
    return fx.tree_digest(a) == fx.tree_digest(b)


# A compiled autograd step on 4 residual MLP blocks (width 256, 2048 rows), in a fresh process,
# measured by the kernel's high-water mark of its resident memory (VmHWM, reset by
# /proc/self/clear_refs after two steps): what one step adds at its peak. glibc's mmap
# threshold is fixed, so freed blocks go back to the system at once (its default threshold
# grows with the blocks freed, and later ones then stay in the heap). ``aot_eager`` runs the
# graph AOT autograd makes, recomputation included, op by op: seconds to compile.
REMAT_PROBE = """
import re, sys, torch, torch.nn.functional as F
from torch import nn
import fxtrain as fx

torch.set_num_threads(1)
remat = sys.argv[1] == "remat"

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(h)))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, h):
        for block in self.blocks:
            h = fx.remat(block, h) if remat else block(h)
        return h

def high_water():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

torch.manual_seed(0)
state = fx.TrainState.create(Net(), fx.optim.sgd(0.1))
step = torch.compile(fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean(),
                                        autodiff="autograd"), fullgraph=True, backend="aot_eager")
x = torch.randn(2048, 256)
for _ in range(2):
    state, _ = step(state, x)
open("/proc/self/clear_refs", "w").write("5")
before = high_water()
state, _ = step(state, x)
print(high_water() - before)
"""


def step_peak_bytes(probe: str, *args: str) -> int:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    return int(out.stdout.split()[-1])


# -- test_random_ops.py's helpers -----------------------------------------------------------------

# A compiled torch.func step on a stack of attention layers with dropout 0.1 (batch 2, 4 heads,
# 512 positions: an attention matrix is 8.4 MB in float32), in a fresh process; see
# test_remat's REMAT_PROBE for how its peak is measured.
ATTENTION_PROBE = """
import re, sys, torch, torch.nn.functional as F
from torch import nn
import fxtrain as fx

torch.set_num_threads(1)
depth = int(sys.argv[1])

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(64, 192), nn.Linear(64, 64)

    def forward(self, x):
        q, k, v = (z.unflatten(-1, (4, -1)).transpose(1, 2) for z in self.qkv(x).split(64, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        return x + self.proj(y.transpose(1, 2).flatten(2))

def high_water():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

torch.manual_seed(0)
state = fx.TrainState.create(nn.Sequential(*(Attention() for _ in range(depth))),
                             fx.optim.sgd(0.1))
step = torch.compile(fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean()),
                     fullgraph=True, backend="aot_eager")
x = torch.randn(2, 512, 64)
state, _ = step(state, x)
open("/proc/self/clear_refs", "w").write("5")
before = high_water()
state, _ = step(state, x)
print(high_water() - before)
"""
