"""What the optax-parity tests share: one small parameter dict, its gradients, and one optimizer
run through optax and through fx.optim from the same start (the ``x64`` fixture, in
conftest.py, turns JAX's float64 on)."""

import numpy as np
import torch

from fxtrain import optim
from helpers import extra, graph_count

STEPS = 60


def params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 3, generator=g, dtype=dtype),
            "b": torch.randn(3, generator=g, dtype=dtype),
            "s": torch.randn((), generator=g, dtype=dtype)}


def grads(params, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
            for _ in range(steps)]


def to_jax(tree):
    jnp = extra("jax.numpy")
    return {k: jnp.asarray(v.numpy()) for k, v in tree.items()}


def to_torch(tree):
    return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in tree.items()}


def run_optax_with_state(ref, params, grads, wrap=lambda p: p):
    """optax's final params and state (JAX values); ``wrap`` makes optax's params from ours
    (``optax.LookaheadParams.init_synced`` for lookahead). The update is jitted: the same maths,
    traced once instead of dispatched op by op (lax.cond in eager JAX retraces every call)."""
    jax, optax = extra("jax"), extra("optax")
    theirs = wrap(to_jax(params))
    state = ref.init(theirs)
    update = jax.jit(ref.update)
    for grad in grads:
        updates, state = update(to_jax(grad), state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    return theirs, state


def run_optax(ref, params, grads):
    return to_torch(run_optax_with_state(ref, params, grads)[0])


def run_fx_with_state(tx, params, grads):
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(grad, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def run_fx(tx, params, grads):
    return run_fx_with_state(tx, params, grads)[0]


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_compiled(tx, params, grads):
    """``run_fx`` through one ``torch.compile(fullgraph=True)``'d update (the eager backend):
    asserts it is one graph that never recompiles over ``grads``; returns the final params."""
    def step(params, state, grad):
        updates, state = tx.update(grad, state, params)
        return optim.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    state = tx.init(params)
    params, state = compiled(params, state, grads[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for grad in grads[1:]:
            params, state = compiled(params, state, grad)
    assert graph_count() == 1
    return params


def checkpoint_round_trip(make_tx, module, directory):
    """A ``TrainState`` of ``module`` with ``make_tx()`` after two updates, saved and restored
    into a fresh one: asserts the restored state is bit-identical; returns it."""
    import fxtrain as fx

    torch.manual_seed(0)
    state = fx.TrainState.create(module(), make_tx())
    grads = {k: torch.randn_like(v) for k, v in state.params.items()}
    state = state.apply_gradients(grads).apply_gradients(grads)
    fx.checkpoint.save(directory / "ckpt", state)
    restored = fx.checkpoint.restore(directory / "ckpt",
                                     like=fx.TrainState.create(module(), make_tx()))
    assert fx.tree_digest(restored) == fx.tree_digest(state)
    assert type(restored.opt_state) is type(state.opt_state)
    return restored
