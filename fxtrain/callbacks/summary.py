"""``summary``: a table of the run at train_begin (model, parameters, optimizer, data, devices).

Rendered with rich, which draws box tables in terminals and HTML in notebooks. Everything is
read from the ``TrainState`` and the train_begin event; the callback has no state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import torch

from .. import distributed
from ..optim.wrappers import learning_rate
from .combinators import rank_zero
from .core import NOTHING, Callback


def _numel_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def parameter_counts(state: Any) -> dict[str, int]:
    """Element counts and bytes of a state's parameters and buffers.

    Frozen parameters (``requires_grad=False`` in the module) live in ``state.buffers`` and are
    told apart from true buffers by the module's parameter names.

    Args:
      state: a ``TrainState``.

    Returns:
      ``{"total", "trainable", "frozen", "buffers", "param_bytes", "buffer_bytes"}``; total is
      trainable + frozen.

    Examples:
        >>> from fxtrain.callbacks.summary import parameter_counts
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        >>> _ = model[0].bias.requires_grad_(False)  # a frozen parameter
        >>> parameter_counts(fx.TrainState.create(model, fx.optim.sgd(0.1)))
        {'total': 44, 'trainable': 40, 'frozen': 4, 'buffers': 9, 'param_bytes': 176,
         'buffer_bytes': 40}
    """
    names = {n for n, _ in state.module.named_parameters()}
    buffers = state.buffers or {}
    trainable, trainable_bytes = _numel_bytes(state.params.values())
    frozen, frozen_bytes = _numel_bytes(v for k, v in buffers.items() if k in names)
    other, other_bytes = _numel_bytes(v for k, v in buffers.items() if k not in names)
    return {"total": trainable + frozen, "trainable": trainable, "frozen": frozen,
            "buffers": other, "param_bytes": trainable_bytes + frozen_bytes,
            "buffer_bytes": other_bytes}


def _by_submodule(state: Any) -> list[tuple[str, str, int, int, int]]:
    """(name, type, parameters, trainable, buffers) per top-level submodule that holds any."""
    names = {n for n, _ in state.module.named_parameters()}
    counts: dict[str, list[int]] = {}
    for tensors, trainable in ((state.params, True), (state.buffers or {}, False)):
        for key, t in tensors.items():
            row = counts.setdefault(key.split(".", 1)[0] if "." in key else "", [0, 0, 0])
            is_param = trainable or key in names
            row[0 if is_param else 2] += t.numel()
            row[1] += t.numel() if trainable else 0
    children = dict(state.module.named_children())
    order = [*children, ""]
    return [(name or "(own)", type(children.get(name, state.module)).__name__, *counts[name])
            for name in order if name in counts]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def describe_optimizer(opt_state: Any) -> str:
    """A readable outline of an optimizer from the types in its state.

    A transform's NamedTuple or dataclass state ``ScaleByAdamState`` reads ``scale_by_adam``;
    a chain's tuple reads ``chain(...)``; a wrapper shows the states it holds in parentheses.
    Transforms without state (None) do not show.

    Args:
      opt_state: ``state.opt_state``.

    Returns:
      The outline, e.g. ``"chain(scale_by_adam, scale_by_learning_rate)"``; "" if nothing shows.

    Examples:
        >>> from fxtrain.callbacks.summary import describe_optimizer
        >>> params = {"w": torch.zeros(2)}
        >>> describe_optimizer(fx.optim.adam(1e-3).init(params))
        'chain(scale_by_adam, scale_by_learning_rate)'
        >>> tx = fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=0.1, momentum=0.9)
        >>> describe_optimizer(tx.init(params))
        'inject_hyperparams(chain(trace, scale_by_learning_rate))'
    """
    if type(opt_state) in (tuple, list):
        parts = [p for p in map(describe_optimizer, opt_state) if p]
        return parts[0] if len(parts) == 1 else f"chain({', '.join(parts)})" if parts else ""
    if isinstance(opt_state, tuple):
        children = tuple(opt_state)
    elif dataclasses.is_dataclass(opt_state) and not isinstance(opt_state, type):
        children = tuple(getattr(opt_state, f.name) for f in dataclasses.fields(opt_state))
    else:
        return ""
    name = _snake(type(opt_state).__name__.removesuffix("State"))
    inner = [p for p in map(describe_optimizer, children) if p]
    return f"{name}({', '.join(inner)})" if inner else name


def _distinct(values: Iterable[Any]) -> str:
    return ", ".join(sorted({str(v).removeprefix("torch.") for v in values}))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _show(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(
        value, bool) else str(value)


def _sections(state: Any, event: Any) -> dict[str, dict[str, str]]:
    """The summary's rows, grouped by section."""
    counts, info = parameter_counts(state), event.metrics or {}
    lr = learning_rate(state.opt_state)
    params = state.params.values()
    return {
        "Model": {"model": type(state.module).__name__, "parameters": _show(counts["total"]),
                  "trainable": _show(counts["trainable"]), "frozen": _show(counts["frozen"]),
                  "buffers": _show(counts["buffers"]),
                  "parameter memory": _size(counts["param_bytes"]),
                  "buffer memory": _size(counts["buffer_bytes"])},
        "Optimizer": {"optimizer": describe_optimizer(state.opt_state) or "-",
                      "learning rate": "-" if lr is None else f"{float(lr):.4g}"},
        "Data": {k.replace("_", " "): _show(info.get(k))
                 for k in ("steps_per_epoch", "batch_size", "eval_batches")},
        "Run": {**{k.replace("_", " "): _show(info.get(k))
                   for k in ("max_steps", "max_epochs", "sync_every", "steps_per_call", "compiled",
                             "cuda_graphs")},
                "precision": _show(info.get("precision", "32")),
                "start step": _show(event.step), "start epoch": _show(event.epoch)},
        "Hardware": {"device": _distinct(t.device for t in params),
                     "dtype": _distinct(t.dtype for t in params),
                     "world size": _show(distributed.world_size())},
    }


def _render(sections: Mapping[str, Mapping[str, str]], rows: list, file: TextIO | None):
    from rich.console import Console
    from rich.table import Table

    main = Table(title="Training summary", show_header=False, title_justify="left")
    main.add_column(style="bold")
    main.add_column()
    main.add_column(overflow="fold")
    for i, (section, entries) in enumerate(sections.items()):
        if i:
            main.add_section()
        for j, (key, value) in enumerate(entries.items()):
            main.add_row(section if j == 0 else "", key, value)
    parts = Table(title="Parameters by submodule", title_justify="left")
    for column in ("submodule", "type", "parameters", "trainable", "buffers"):
        parts.add_column(column, justify="left" if column in ("submodule", "type") else "right")
    for name, kind, *numbers in rows:
        parts.add_row(name, kind, *map(_show, numbers))
    console = Console() if file is None else Console(file=file, force_jupyter=False)
    console.print(main, parts)


def summary(*, file: TextIO | None = None, name: str = "summary") -> Callback:
    """A host callback that prints a summary of the run at train_begin (rank 0 only).

    Shows the model class, parameter counts (total, trainable, frozen, buffers) and memory, a
    second table of parameters per top-level submodule, the optimizer (from its state types)
    and learning rate, the data and run settings from the train_begin event, device, dtype,
    world size, and the step and epoch the run starts at (non-zero when resumed).

    Args:
      file: where to print (default standard output, or a notebook cell's HTML output).
      name: the callback's name.

    Returns:
      A stateless host ``Callback``.

    Examples:
        >>> import sys
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> state = fx.TrainState.create(model, fx.optim.sgd(0.1))
        >>> x = torch.randn(32, 2)
        >>> state = fx.fit(state, fx.make_train_step(loss_fn),
        ...                fx.data.Batches((x, x.sum(1, keepdim=True)), 4), max_steps=2,
        ...                callbacks=[fx.callbacks.summary(file=sys.stdout)])
        Training summary
        ┌───────────┬──────────────────┬────────────────────────┐
        │ Model     │ model            │ Sequential             │
        │           │ parameters       │ 25                     │
        │           │ trainable        │ 25                     │
        │           │ frozen           │ 0                      │
        │           │ buffers          │ 9                      │
        │           │ parameter memory │ 100 B                  │
        │           │ buffer memory    │ 40 B                   │
        ├───────────┼──────────────────┼────────────────────────┤
        │ Optimizer │ optimizer        │ scale_by_learning_rate │
        │           │ learning rate    │ 0.1                    │
        ├───────────┼──────────────────┼────────────────────────┤
        │ Data      │ steps per epoch  │ 8                      │
        │           │ batch size       │ 4                      │
        │           │ eval batches     │ -                      │
        ├───────────┼──────────────────┼────────────────────────┤
        │ Run       │ max steps        │ 2                      │
        ...
        │           │ start step       │ 0                      │
        │           │ start epoch      │ 0                      │
        ├───────────┼──────────────────┼────────────────────────┤
        │ Hardware  │ device           │ cpu                    │
        │           │ dtype            │ float32                │
        │           │ world size       │ 1                      │
        └───────────┴──────────────────┴────────────────────────┘
        Parameters by submodule
        ┏━━━━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━┓
        ┃ submodule ┃ type        ┃ parameters ┃ trainable ┃ buffers ┃
        ┡━━━━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━┩
        │ 0         │ Linear      │         12 │        12 │       0 │
        │ 2         │ BatchNorm1d │          8 │         8 │       9 │
        │ 3         │ Linear      │          5 │         5 │       0 │
        └───────────┴─────────────┴────────────┴───────────┴─────────┘
    """

    def fn(state, event):
        _render(_sections(state, event), _by_submodule(state), file)
        return state, NOTHING

    return rank_zero(Callback(name=name, init=None, fn=fn, kinds=("train_begin",), host=True))
