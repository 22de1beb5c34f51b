"""Every schedule fx.optim shares with optax gives optax's values in float64, eagerly and in one
compiled graph that never recompiles as the count moves; nonsensical arguments are ValueErrors
that name the schedule."""

import numpy as np
import pytest
import torch
import torch._dynamo

from fxtrain import optim
from helpers import TRACED, extra

COUNTS = range(200)
CYCLE = dict(init_value=0.1, peak_value=1.0, warmup_steps=5, decay_steps=40, end_value=0.01)
# (name, args, kwargs): each is called as fx.optim.<name>(*args, **kwargs) and as optax.<name>
CASES = [
    ("constant_schedule", (0.3,), {}),
    ("linear_schedule", (1.0, 0.1, 50), {}),
    ("linear_schedule", (0.2, 1.0, 30), dict(transition_begin=17)),
    ("polynomial_schedule", (1.0, 0.01, 2.0, 100), {}),
    ("polynomial_schedule", (0.5, 2.0, 0.5, 37), dict(transition_begin=11)),
    ("cosine_decay_schedule", (2.0, 120), {}),
    ("cosine_decay_schedule", (1.0, 70), dict(alpha=0.1, exponent=2.0)),
    ("exponential_decay", (1.0, 10, 0.5), {}),
    ("exponential_decay", (1.0, 7, 0.8), dict(transition_begin=13, staircase=True,
                                              end_value=0.2)),
    ("exponential_decay", (0.1, 20, 1.5), dict(end_value=2.0)),
    ("piecewise_constant_schedule", (1.0,), {}),
    ("piecewise_constant_schedule", (1.0, {150: 0.1, 30: 0.5, 90: 0.2}), {}),
    ("piecewise_interpolate_schedule", ("linear", 1.0, {40: 0.5, 41: 3.0, 120: 0.01}), {}),
    ("piecewise_interpolate_schedule", ("cosine", 0.5, {0: 2.0, 77: 0.1}), {}),
    ("cosine_onecycle_schedule", (150, 1.0), {}),
    ("cosine_onecycle_schedule", (77, 0.3), dict(pct_start=0.45, div_factor=10.0,
                                                 final_div_factor=100.0)),
    ("linear_onecycle_schedule", (150, 1.0), {}),
    ("linear_onecycle_schedule", (63, 0.3), dict(pct_start=0.1, pct_final=0.7,
                                                 div_factor=5.0, final_div_factor=50.0)),
    ("warmup_constant_schedule", (0.0, 1.0, 25), {}),
    ("warmup_constant_schedule", (0.5, 0.1, 1), {}),
    ("warmup_cosine_decay_schedule", (0.0, 1.0, 10, 150), {}),
    ("warmup_cosine_decay_schedule", (0.1, 0.5, 0, 99), dict(end_value=0.05, exponent=1.5)),
    ("warmup_exponential_decay_schedule", (0.0, 1.0, 20, 15, 0.7), {}),
    ("warmup_exponential_decay_schedule", (0.2, 1.0, 0, 9, 0.6),
     dict(transition_begin=5, staircase=True, end_value=0.1)),
    ("sgdr_schedule", ([CYCLE, CYCLE, dict(CYCLE, decay_steps=100, warmup_steps=0)],), {}),
    ("sgdr_schedule", ([dict(CYCLE, decay_steps=33, exponent=2.0)] * 7,), {}),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def _optax_values(optax, name, args, kwargs):
    jax = extra("jax")
    jnp = extra("jax.numpy")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        values = jax.vmap(getattr(optax, name)(*args, **kwargs))(jnp.arange(len(COUNTS)))
        return np.broadcast_to(np.asarray(values, dtype=np.float64), len(COUNTS)).tolist()
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="module")
def reference():
    """optax's values for every case, computed once."""
    optax = extra("optax")
    return [_optax_values(optax, *case) for case in CASES]


def _ours(name, args, kwargs):
    return getattr(optim, name)(*args, **kwargs)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_eager_equals_optax(reference, i):
    schedule = _ours(*CASES[i])
    values = [schedule(torch.tensor(t)) for t in COUNTS]
    assert all(v.dtype == torch.float64 and v.shape == () for v in values)
    np.testing.assert_allclose([float(v) for v in values], reference[i], rtol=0, atol=1e-7)


def test_compiled_equals_optax_without_recompiling(reference):
    """All cases in one fullgraph-compiled function: compiled once, never again over 200
    counts."""
    schedules = [_ours(*case) for case in CASES]
    every = torch.compile(lambda count: torch.stack([s(count) for s in schedules]),
                          fullgraph=True, backend=TRACED)
    with torch._dynamo.config.patch(error_on_recompile=True):
        values = torch.stack([every(torch.tensor(t)) for t in COUNTS]).T
    np.testing.assert_allclose(values.numpy(), np.array(reference), rtol=0, atol=1e-7)


def test_every_shared_schedule_is_compared():
    """join_schedules is compared through the warm-up schedules and sgdr, which are joins."""
    optax = extra("optax")
    shared = {name for name in optim.schedules.__all__ if hasattr(optax, name)}
    assert shared - {"join_schedules"} <= {name for name, _, _ in CASES}


BAD = [
    (lambda: optim.exponential_decay(1.0, 0, 0.5), "exponential_decay.*transition_steps"),
    (lambda: optim.exponential_decay(1.0, 10, 0.0), "exponential_decay.*decay_rate"),
    (lambda: optim.exponential_decay(1.0, 10, 0.5, transition_begin=-1),
     "exponential_decay.*transition_begin"),
    (lambda: optim.polynomial_schedule(1.0, 0.0, 2, 10, transition_begin=-3),
     "polynomial_schedule.*transition_begin"),
    (lambda: optim.linear_schedule(1.0, 0.0, 10, transition_begin=-3),
     "linear_schedule.*transition_begin"),
    (lambda: optim.piecewise_constant_schedule(1.0, {-1: 0.5}),
     "piecewise_constant_schedule.*boundaries"),
    (lambda: optim.piecewise_constant_schedule(1.0, {10: -0.5}),
     "piecewise_constant_schedule.*non-negative scale"),
    (lambda: optim.piecewise_interpolate_schedule("cubic", 1.0), "interpolate_type"),
    (lambda: optim.piecewise_interpolate_schedule("linear", 1.0, {-5: 2.0}),
     "piecewise_interpolate_schedule.*boundaries"),
    (lambda: optim.cosine_onecycle_schedule(0, 1.0), "cosine_onecycle_schedule.*transition_steps"),
    (lambda: optim.cosine_onecycle_schedule(100, 1.0, pct_start=1.0),
     "cosine_onecycle_schedule.*pct_start"),
    (lambda: optim.linear_onecycle_schedule(100, 1.0, pct_start=0.0),
     "linear_onecycle_schedule.*pct_start"),
    (lambda: optim.linear_onecycle_schedule(-4, 1.0), "linear_onecycle_schedule.*transition_steps"),
    (lambda: optim.linear_onecycle_schedule(100, 1.0, pct_start=0.5, pct_final=0.4),
     "linear_onecycle_schedule.*pct_final"),
    (lambda: optim.warmup_constant_schedule(0.0, 1.0, 0), "warmup_constant_schedule.*warmup_steps"),
    (lambda: optim.warmup_exponential_decay_schedule(0.0, 1.0, 5, 0, 0.5),
     "exponential_decay.*transition_steps"),
    (lambda: optim.cosine_decay_schedule(1.0, 0), "cosine_decay_schedule.*decay_steps"),
    (lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps"),
    (lambda: optim.sgdr_schedule([]), "sgdr_schedule"),
    (lambda: optim.join_schedules([optim.constant_schedule(1.0)] * 3, [10, 5]),
     "join_schedules.*increasing"),
    (lambda: optim.join_schedules([optim.constant_schedule(1.0)] * 2, [-1]),
     "join_schedules.*non-negative"),
]


@pytest.mark.parametrize("make, message", BAD, ids=[m.split(".")[0] for _, m in BAD])
def test_bad_arguments_are_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
