"""``fx.shard(offload="optimizer")`` in one process (a one-rank gloo group): the optimizer state
lives on the host and a step there gives the bits of a step without it, for every update path
(the fused AdamW, the elementwise updates on the local shards, a clipped chain through DTensor),
donated or not; the accelerator's branch (pinned host memory) forced with a tensor that says it
is on CUDA. The ranks' checks: tests/ranks/test_offload_ranks.py."""

import pytest
import torch
import torch.utils._pytree as pytree

import fxtrain as fx
from fxtrain.distributed import _offload
from fxtrain.step._phases import revert_update

pytestmark = pytest.mark.compat

OPTIMIZERS = {
    "adamw (fused)": lambda: fx.optim.adamw(1e-2, weight_decay=0.1),
    "sgd momentum (on the shards)": lambda: fx.optim.sgd(1e-2, momentum=0.9)._replace(
        fused=None),
    "clipped adam (through DTensor)": lambda: fx.optim.chain(
        fx.optim.clip_by_global_norm(0.1), fx.optim.adam(1e-2)),
}


def _local(x):
    return x.to_local() if hasattr(x, "to_local") else x


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("name,compiled", [(n, False) for n in OPTIMIZERS]
                         + [("adamw (fused)", True)])
def test_an_offloaded_step_gives_the_bits_of_one_without_it(one_rank, name, compiled):
    step = fx.make_train_step(lambda s, p, x: s.apply(p, x).square().mean())
    if compiled:
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    plain = fx.shard(fx.TrainState.create(_model(), OPTIMIZERS[name]()))
    offloaded = fx.shard(fx.TrainState.create(_model(), OPTIMIZERS[name]()), offload="optimizer")
    assert offloaded.layout.offload == "optimizer" and "offload='optimizer'" in repr(
        offloaded.layout)
    for donate in (False, True, True):  # the second donated step writes into the state
        plain, _ = step(plain, batch, donate=donate)
        offloaded, metrics = step(offloaded, batch, donate=donate)
    assert offloaded.layout.offload == "optimizer"
    for a, b in zip(pytree.tree_leaves((offloaded.params, offloaded.opt_state)),
                    pytree.tree_leaves((plain.params, plain.opt_state))):
        assert type(a) is type(b) and (a is None or torch.equal(_local(a), _local(b)))
    assert all(_local(x).device.type == "cpu" for x in pytree.tree_leaves(offloaded.opt_state)
               if isinstance(x, torch.Tensor))
    assert metrics["loss"].device == metrics["grad_norm"].device


def test_a_reverted_update_keeps_the_offloaded_state_where_it_was(one_rank):
    old = fx.shard(fx.TrainState.create(_model(), fx.optim.adamw(1e-2)), offload="optimizer")
    grads = {k: torch.ones_like(p) for k, p in old.params.items()}
    new = old.apply_gradients(grads)
    kept = revert_update(old, new, torch.tensor(True))
    taken = revert_update(old, new, torch.tensor(False))
    def leaves(s):
        return [_local(x) for x in pytree.tree_leaves(s.opt_state) if x is not None]

    assert all(torch.equal(a, b) for a, b in zip(leaves(kept), leaves(old)))
    assert not all(torch.equal(a, b) for a, b in zip(leaves(taken), leaves(old)))


def test_an_unknown_offload_is_refused_by_name():
    state = fx.TrainState.create(_model(), fx.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"offload='params'.*\['optimizer'\]"):
        fx.shard(state, offload="params")


class OnAccelerator(torch.Tensor):
    """A tensor that says it is on CUDA (its data on the CPU): what an accelerator's shard is
    to the offload's copies, on a machine without one."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype,
                                                   device=torch.device("cuda"))

    def __init__(self, data):
        self.inner = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrapped(t):
            return t.inner if isinstance(t, OnAccelerator) else t
        return func(*pytree.tree_map(unwrapped, args), **pytree.tree_map(unwrapped, kwargs or {}))


def test_a_shard_on_an_accelerator_goes_to_pinned_host_memory(monkeypatch):
    asked = []
    empty = torch.empty

    def recording(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)  # this machine has no pinned allocator: recorded, not pinned
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording)
    shard = OnAccelerator(torch.arange(6.0).reshape(2, 3))
    host = _offload.to_host({"m": shard})["m"]
    assert asked == [True]
    assert type(host) is torch.Tensor and host.device.type == "cpu"
    assert torch.equal(host, torch.arange(6.0).reshape(2, 3))
    assert host.untyped_storage().data_ptr() != shard.inner.untyped_storage().data_ptr()


def test_a_tensor_already_on_the_host_is_not_copied_and_a_skeleton_stays_meta():
    t = torch.ones(3)
    assert _offload.to_host({"t": t})["t"] is t
    meta = torch.empty(3, device="meta")
    assert _offload.to_host({"m": meta})["m"] is meta
    back = _offload.to_devices({"t": t}, like={"t": meta})  # back to the like's device
    assert back["t"].is_meta


def test_from_pretrained_alone_refuses_an_offload(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=8)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="offload lay the model out over several ranks"):
        fx.from_pretrained(tmp_path, fx.optim.adamw(1e-3), offload="optimizer")
