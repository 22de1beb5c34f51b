"""The run's layout is a value of the state (``state.layout``, ``fx.distributed.Layout``), never a
process global: ``TrainState.create`` (and ``fx.shard``, on several ranks: test_tensor_parallel.py)
writes no module-level value of fxtrain, and states of other layouts, tied models and untied ones,
made in one process in either order, train as each does alone."""

import subprocess
import sys
import sys as _sys
import types

import torch
from torch import nn

import fxtrain as fx


class Tied(nn.Module):
    """An embedding tied to its head: the state keeps ``emb.weight`` once, and a mask may name
    the head's ``head.weight`` for it."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(10, 4), nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.ln(self.emb(x)))


class Untied(Tied):
    """The same names, not tied: ``head.weight`` is a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.head.weight = nn.Parameter(self.emb.weight.detach().clone())


def made(kind):
    torch.manual_seed(0)
    tx = fx.optim.adamw(0.1, weight_decay=0.5, mask=["head.weight"])  # the head decays
    return fx.TrainState.create(Tied() if kind == "tied" else Untied(), tx, seed=0)


def trained(state, steps=3):
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).logsumexp(-1).mean())
    x = torch.arange(6).view(2, 3)
    for _ in range(steps):
        state, _ = step(state, x)
    return fx.tree_digest(state)


RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_layout import made, trained
states = {{kind: made(kind) for kind in {kinds!r}}}  # all made before any trains
print(" ".join(trained(states[kind]) for kind in {kinds!r}))
"""


def digests(*kinds):
    """The digests of ``kinds`` made in this order in a process of their own, then trained (a
    fresh process: nothing made before them, and torch's settings its own)."""
    import pathlib
    code = RUN.format(tests=str(pathlib.Path(__file__).parent), kinds=kinds)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return dict(zip(kinds, out.stdout.strip().splitlines()[-1].split()))


def module_values():
    """Every module-level value of every fxtrain module loaded, by (module, name): its
    identity, and for a container the identities of what it holds."""
    out = {}
    for name, module in list(_sys.modules.items()):
        if not name.startswith("fxtrain") or not isinstance(module, types.ModuleType):
            continue
        for key, value in vars(module).items():
            held = ()
            if isinstance(value, dict):
                held = tuple((k, id(v)) for k, v in value.items())
            elif isinstance(value, (list, set)):
                held = tuple(sorted(map(id, value)))
            out[name, key] = (id(value), held)
    return out


def test_create_writes_no_module_level_value_and_tied_names_are_the_states():
    made("untied")  # every module loaded, its caches made
    before = module_values()
    tied = made("tied")
    assert module_values() == before
    assert tied.layout.tied == (("emb.weight", "head.weight"),)
    assert made("untied").layout.tied == ()
    assert list(tied.params) == ["emb.weight", "ln.weight", "ln.bias"]


def test_a_layout_is_part_of_the_states_structure_not_its_leaves():
    state = made("tied")
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    again = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert again.layout is state.layout and again.module is state.module
    assert fx.distributed.data_world_size(state) == 1 and fx.distributed.data_rank(state) == 0
    assert fx.distributed.tensor_parallel_size(state) == 1
    assert state.replace(step=state.step + 1).layout is state.layout


HOOK = """
import sys
import torch
from torch import nn
import fxtrain as fx
state = fx.TrainState.create(nn.Linear(2, 2), fx.optim.sgd(0.1))
step = fx.make_train_step(lambda s, p, b: s.apply(p, b).sum(), autodiff="autograd")
assert "torch._dynamo" not in sys.modules, "building a step imported Dynamo"
import torch._dynamo
config = torch._dynamo.config
print(config.trace_autograd_ops, config.skip_fwd_side_effects_in_bwd_under_checkpoint)
state, metrics = torch.compile(step, fullgraph=True, backend="aot_eager")(state, torch.ones(3, 2))
print(config.trace_autograd_ops, config.skip_fwd_side_effects_in_bwd_under_checkpoint)
"""
