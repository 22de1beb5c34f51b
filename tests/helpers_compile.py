"""The block-stacked model, loss and loop of the regional-compile tests (tests/unit/test_regions.py,
test_compile.py)."""

import torch
import torch.nn.functional as F
from torch import nn

import fxtrain as fx


# -- test_regions.py's helpers --------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.25)

    def forward(self, h):
        return h + self.drop(self.down(F.gelu(self.up(self.norm(h)))))


class Net(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.dropout(self.embed(x), 0.1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def loss_fn(state, params, batch):
    x, y = batch
    return F.cross_entropy(state.apply(params, x), y)


def setup(depth=3):
    torch.manual_seed(0)
    state = fx.TrainState.create(Net(depth), fx.optim.adamw(1e-2), seed=3)
    g = torch.Generator().manual_seed(1)
    return state, (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))


def trained(step, state, batch, n=3):
    for _ in range(n):
        state, metrics = step(state, batch)
    return state, metrics
