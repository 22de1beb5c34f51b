import pytest
import torch
import torch.nn.functional as F

from fxtrain import random


def test_uniform_is_uniform_and_keyed():
    key = random.seed_key(0)
    u = random.uniform(key, (100_000,))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, random.uniform(key, (100_000,)))
    assert not torch.equal(u, random.uniform(random.seed_key(1), (100_000,)))


def test_normal_moments():
    z = random.normal(random.seed_key(3), (200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_step_keys_differ_per_step_and_seed():
    keys = {int(random.step_key(random.seed_key(s), torch.tensor(t))) for s in range(5) for t in range(50)}
    assert len(keys) == 250


def test_dropout_under_keyed_is_deterministic_with_right_rate():
    x = torch.ones(200, 500)
    with random.keyed(random.seed_key(7)):
        a = F.dropout(x, 0.3)
        b = F.dropout(x, 0.3)  # second call in the same context: a fresh mask
    with random.keyed(random.seed_key(7)):
        a2 = F.dropout(x, 0.3)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert abs(float((a == 0).float().mean()) - 0.3) < 0.01
    assert torch.allclose(a[a != 0], torch.full_like(a[a != 0], 1 / 0.7))


def test_channel_dropout_masks_whole_channels():
    x = torch.ones(4, 32, 5, 5)
    with random.keyed(random.seed_key(0)):
        y = F.dropout2d(x, 0.5)
    per_channel = y.flatten(2)
    assert torch.all((per_channel == 0).all(-1) | (per_channel != 0).all(-1))


@pytest.mark.parametrize("compiled", [False, True])
def test_uncovered_random_ops_raise(compiled):
    def f(key, x):
        with random.keyed(key):
            return torch.multinomial(x, 2)

    f = torch.compile(f, fullgraph=True, backend="eager") if compiled else f
    with pytest.raises(Exception, match="multinomial"):
        f(random.seed_key(0), torch.ones(4))


def test_compiled_equals_eager_and_ignores_global_rng():
    def f(key, x):
        with random.keyed(key):
            return F.dropout(x, 0.5), F.dropout2d(x[None], 0.5), torch.bernoulli(x.sigmoid())

    key, x = random.seed_key(11), torch.randn(64, 32)
    eager = f(key, x)
    compiled = torch.compile(f, fullgraph=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        for a, b in zip(eager, compiled(key, x)):
            assert torch.equal(a, b)


def test_explicit_draws_compile_bit_identically_for_uniform():
    f = lambda key: random.uniform(random.fold_in(key, 1), (8, 8))  # noqa: E731
    key = random.seed_key(5)
    assert torch.equal(f(key), torch.compile(f, fullgraph=True)(key))


@pytest.mark.hardware
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_keyed_dropout_compiles_for_cuda_and_matches_the_cpu():
    """Inductor's Triton code once typed the element hash's arange * multiplier as int32 (a
    compile error); the masks on the GPU, eager and compiled, equal the CPU's."""
    def f(key, x):
        with random.keyed(key):
            y = F.dropout(x, 0.5)
        return y, y.relu().sum(0)  # a reduction over the mask: the kernel that failed

    key, x = random.seed_key(11), torch.randn(64, 32)
    cpu = f(key, x)
    gpu = f(key.cuda(), x.cuda())
    compiled = torch.compile(f, fullgraph=True)(key.cuda(), x.cuda())
    for out in (gpu, compiled):
        assert torch.equal(out[0].cpu(), cpu[0])
        torch.testing.assert_close(out[1].cpu(), cpu[1])


def test_key_derivations_agree_across_their_implementations():
    """fold_in and its range and stream forms run in Python ints (a CPU 0-d key), numpy (CPU
    arrays) or torch (any other device, as on a GPU): the same keys from each."""
    from fxtrain.random import _fold, _mix32

    for seed in (0, 1, 12345, 2**31 + 7):
        key = random.seed_key(seed)
        by_torch = torch.stack([_fold(key, torch.tensor(i)) for i in range(5, 21)])
        assert torch.equal(torch.ops.fxtrain.fold_in_range(key, 5, 16), by_torch)
        assert torch.equal(torch.ops.fxtrain.fold_in_range(key, 5, 1), by_torch[:1])
        assert torch.equal(torch.ops.fxtrain.fold_in_range_after(key, torch.tensor(2), 3, 16),
                           by_torch)  # a region's keys: from where the stream stood (2)
        for i in (5, 9, 20):
            assert torch.equal(random.fold_in(key, torch.tensor(i)), by_torch[i - 5])
            assert torch.equal(random.fold_in(key, i), by_torch[i - 5])
        assert torch.equal(torch.ops.fxtrain.stream_key(key, 3), _mix32(key + 3 * 0x9E3779B9))
        keys = torch.stack([key, random.seed_key(seed + 1)])  # not 0-d: the numpy path
        assert torch.equal(random.fold_in(keys, torch.tensor(9))[0], by_torch[4])
        assert torch.equal(torch.ops.fxtrain.fold_in_range_after(keys, torch.tensor(2), 3, 16)[0],
                           by_torch)
