"""What the loop needs to know about a train step, fixed when the step is built.

``make_train_step`` attaches one frozen ``StepSpec`` to the step it returns (``step.spec``);
``torch.compile`` carries it over (it copies the function's attributes onto its wrapper) and
``cuda_graphed`` gives its wrapper the spec of the step it wraps, marked ``cuda_graphs``.
``step_spec(step)`` is the one place that reads it; a step of your own without one gets the
defaults (one step per call, float32, no in-step callbacks, never donating).

Donation is an argument, not a mode: a step built with ``donate=None`` takes ``donate=True``
from its caller (``fx.fit`` passes it), and Dynamo guards that argument like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .._torch.dynamo import is_compiled


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a train step was built.

    Attributes:
      steps_per_call: K > 1: the step takes K stacked batches per call (see ``make_train_step``).
      precision: its precision policy (``"32"``, ``"bf16-mixed"``, ...).
      in_step_callbacks: the callbacks folded inside the step (``fx.fit`` creates their states
        when the state has none).
      step_states: the states the step owns and updates itself (``StepState``: the loss scale
        of ``"16-mixed"``); ``fx.fit`` creates them when the state has none.
      donate: True: the step always donates the state it is given; False: never; None: when
        its caller passes ``donate=True`` (``fx.fit`` does unless a host callback may skip).
      compiled: what ``torch.compile`` returned (set by ``step_spec``, which sees the wrapper).
      cuda_graphs: replayed from a CUDA graph (``fx.cuda_graphed``; it always donates).

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     return state.apply(params, batch).square().mean()
        >>> step = fx.make_train_step(loss_fn, steps_per_call=4)
        >>> fx.step_spec(step)
        StepSpec(steps_per_call=4, precision='32', in_step_callbacks=(), step_states=(),
                 donate=None, compiled=False, cuda_graphs=False)
        >>> fx.step_spec(torch.compile(step)).compiled, fx.step_spec(print).steps_per_call
        (True, 1)
    """

    steps_per_call: int = 1
    precision: str = "32"
    in_step_callbacks: tuple = ()
    step_states: tuple = ()
    donate: bool | None = False
    compiled: bool = False
    cuda_graphs: bool = False

    @property
    def takes_donate(self) -> bool:
        """Whether the step takes a ``donate=`` argument from its caller."""
        return self.donate is None

    def replace(self, **changes) -> StepSpec:
        return dataclasses.replace(self, **changes)


def step_spec(step: Callable) -> StepSpec:
    """The ``StepSpec`` of ``step`` (the defaults for a step without one)."""
    spec = getattr(step, "spec", None)
    spec = spec if isinstance(spec, StepSpec) else StepSpec()
    return spec.replace(compiled=True) if is_compiled(step) and not spec.compiled else spec
