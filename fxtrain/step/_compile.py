"""``fx.compile(train_step, state)``: ``torch.compile`` of a step with what the state's layout
needs, set for that compile only (torchtitan's ``apply_compile`` shape: the settings in the one
place the user asks to compile).

A bare ``torch.compile(train_step, fullgraph=True)`` works too, as before. What ``fx.compile``
adds, from the state's layout:

- ``dynamic=False`` for a state with ``fx.regional``'s blocks (unless given): a region's reuse
  key is a constant of its shapes, and Dynamo's automatic dynamic shapes and floats, which it
  turns on when it compiles a step again (a batch of another size; another learning rate in a
  sweep of steps built again in one process), made symbolic what the key and a region's trace
  read, and failed inside Dynamo;
- Inductor's settings a step's trace may need (``allow_buffer_reuse`` off for a regional step's
  region outputs, ``reorder_for_locality`` off for ``fx.remat`` regions and per-block units:
  ``fxtrain._torch.inductor``), held for each call of the compiled step by
  ``torch._inductor.config.patch`` and put back after it, so that a later ``torch.compile`` of
  anything else in the process gets Inductor's defaults. Under a bare ``torch.compile`` they
  are turned off for the process when the trace first needs them.

- on a CPU whose Inductor kernels are 512 bits wide (AVX-512), for a step that computes in
  bfloat16 (``precision="bf16-mixed"`` or ``"bf16-true"``): ``cpp.simdlen=256``, added to the
  compile's options unless they set it (``fxtrain._torch.vec_isa.bfloat16_options``: a
  kernel with two 32 x 32 bfloat16 tiles came out wrong, and the demo's transformer trained to
  NaN). A bare ``torch.compile`` of such a step takes ``options={"cpp.simdlen": 256}`` for
  the same.

Dynamo's own settings (``trace_autograd_ops``...) are on while a step is traced, whichever way
it is compiled (``fxtrain._torch.traced_settings``). An error fxtrain or the model raises while
Dynamo traces the step reaches the caller as itself, as ``fit`` raises it (a bare
``torch.compile`` wraps it in Dynamo's report, fxtrain's message on its first line).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .._torch import traced_settings
from .._torch.dynamo import marked_compiled
from .._torch.inductor import inductor_settings_kept, mode_options
from .._torch.traced_errors import reraise
from ..state import TrainState


def compile(train_step: Callable, state: TrainState | None = None, *,  # noqa: A001
            dynamic: bool | None = None, backend: Any = "inductor", mode: str | None = None,
            options: dict[str, Any] | None = None) -> Callable:
    """``torch.compile(train_step, fullgraph=True)`` with the settings ``state``'s layout needs,
    for this compile only (see the module).

    Args:
      train_step: a step of ``fx.make_train_step`` (or ``make_eval_step``).
      state: the state it will train (its layout: ``fx.regional``'s blocks, ``fx.shard``'s
        units); None: the settings are read off the first call's state.
      dynamic: ``torch.compile``'s; None: False for a regional state, else torch's default.
      backend: ``torch.compile``'s.
      mode: ``torch.compile``'s.
      options: ``torch.compile``'s (Inductor's options).

    Returns the compiled step, called as ``train_step`` is (``fx.step_spec`` reads its spec).

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> step = fx.compile(fx.make_train_step(lambda s, p, b: s.apply(p, b).square().mean()),
        ...                   state, backend="aot_eager")
        >>> state, metrics = step(state, torch.ones(4, 2))
        >>> fx.step_spec(step).compiled
        True
    """
    if not callable(train_step):
        raise TypeError(f"fx.compile: train_step must be a step (fx.make_train_step(...)), got "
                        f"{type(train_step).__name__}")
    if state is not None and not isinstance(state, TrainState):
        raise TypeError(f"fx.compile: state must be a TrainState (its layout says what the "
                        f"compile needs) or None, got {type(state).__name__}")
    compiled: dict[str, Callable] = {}  # made at the first call where no state was given

    def made(first: Any) -> Callable:
        regional = isinstance(first, TrainState) and bool(first.layout.regions)
        chosen, how = _options(train_step, first, backend, mode, options)
        return torch.compile(train_step, fullgraph=True, backend=backend, mode=how,
                             options=chosen,
                             dynamic=(False if regional else None) if dynamic is None
                             else dynamic)

    if state is not None:
        compiled["step"] = made(state)

    @functools.wraps(train_step)
    def step(*args: Any, **kwargs: Any) -> Any:
        if "step" not in compiled:
            compiled["step"] = made(args[0] if args else kwargs.get("state"))
        with inductor_settings_kept(), traced_settings.kept():
            try:
                return compiled["step"](*args, **kwargs)
            except Exception as e:  # fxtrain's (or the model's) error first, as fit raises it
                reraise(e, "the step")

    return marked_compiled(step, train_step)


def _options(train_step: Callable, state: Any, backend: Any, mode: str | None,
             options: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The compile's Inductor options and mode: the caller's, with ``bfloat16_options``; a
    ``mode`` is then given as its options (``torch.compile`` takes one or the other)."""
    if backend != "inductor":
        return options, mode
    given = {**(mode_options(mode) if mode is not None else {}), **(options or {})}
    chosen = bfloat16_options(train_step, state, given)
    if chosen == given:
        return options, mode
    return chosen, None


def bfloat16_options(train_step: Callable, state: Any,
                     options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``cpp.simdlen=256`` for a step that computes in bfloat16 on a CPU
    whose Inductor kernels are 512 bits wide (see the module), unless they set it."""
    from .._torch import vec_isa
    from ._spec import step_spec
    if not step_spec(train_step).precision.startswith("bf16") or \
            not isinstance(state, TrainState) or state.step.device.type != "cpu" or \
            "cpp.simdlen" in options:
        return options
    return {**vec_isa.bfloat16_options(vec_isa.vector_bits()), **options}
