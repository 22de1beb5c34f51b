"""What a Hugging Face callback's hooks get: ``args``, ``model``, ``optimizer``, ``lr_scheduler``.

``training_arguments`` builds the ``TrainingArguments`` without ``accelerate``. fxtrain keeps
the weights and the optimizer state in the ``TrainState``; these are read-only views of one
state, built when a hook first touches them (``hf_callback`` makes new ones for each event, so
no hook pays for what it does not read):

- ``LazyModule``: ``fx.trained_module(state)`` (a copy of the weights) on first use; it passes
  ``isinstance`` checks for the model's class, so ``model.save_pretrained(dir)`` and
  ``unwrap_model`` work.
- ``OptimizerView``: ``param_groups``, one group holding the parameters, the current learning
  rate as ``"lr"`` and the other injected hyperparameters (``fx.optim.inject_hyperparams``), as
  floats; reading them is one device sync.
- ``SchedulerView``: ``get_last_lr()``, the learning rate the last update used, in a list.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..export import trained_module
from ..logging.numbers import read_floats
from ..optim.wrappers import injected_hyperparams, learning_rate


def transformers_module():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fx.callbacks.hf_callback needs the transformers package: "
                          "pip install fxtrain[hf]") from e
    return transformers


def place(args: Any, device: torch.device) -> None:
    """Gives ``args`` a device without ``accelerate``: its device set-up is a cached property,
    so a value in the instance dict is used instead of running it (no process group, no
    ``accelerate`` import). fxtrain places tensors itself; these fields are for reading."""
    args.__dict__.update(_setup_devices=device, _n_gpu=int(device.type == "cuda"),
                         distributed_state=None)


def training_arguments(overrides: Any, log_every: int) -> tuple[Any, bool]:
    """``TrainingArguments`` from ``overrides`` (a mapping, or a ready instance kept as is)."""
    tf = transformers_module()
    if isinstance(overrides, tf.TrainingArguments):
        return overrides, False
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError("hf_callback: args must be a dict of TrainingArguments fields or a "
                        f"TrainingArguments, got {type(overrides).__name__}")
    kw = {"report_to": "none", "eval_strategy": "steps", "save_strategy": "steps",
          "logging_steps": log_every, **(overrides or {})}
    # a name only: TrainingArguments wants one, fxtrain never writes there (and making a
    # directory per call, as mkdtemp did, left one behind each time)
    kw.setdefault("output_dir", os.path.join(tempfile.gettempdir(), "fxtrain_hf_unused"))
    args = tf.TrainingArguments.__new__(tf.TrainingArguments)
    place(args, torch.device("cpu"))
    try:
        args.__init__(**kw)
    except TypeError as e:
        raise TypeError(f"hf_callback: bad TrainingArguments field in args: {e}") from e
    return args, True


class LazyModule:
    """A stand-in for ``build()``'s module, which it builds on first use (once).

    Attribute reads and writes, calls and ``isinstance`` go to the built module.

    Examples:
        >>> built = []
        >>> model = LazyModule(lambda: built.append(1) or nn.Linear(2, 1))
        >>> built
        []
        >>> isinstance(model, nn.Linear), model.weight.shape, model(torch.zeros(1, 2)).shape
        (True, torch.Size([1, 2]), torch.Size([1, 1]))
        >>> built  # built once
        [1]
    """

    __slots__ = ("_build", "_module")

    def __init__(self, build: Callable[[], Any]):
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_module", None)

    def _get(self) -> Any:
        if self._module is None:
            object.__setattr__(self, "_module", self._build())
        return self._module

    # isinstance(model, PreTrainedModel) reads __class__ when type(model) does not match
    __class__ = property(lambda self: self._get().__class__)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._get(), name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def __getitem__(self, key: Any) -> Any:  # nn.Sequential, nn.ModuleList, nn.ModuleDict
        return self._get()[key]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self):
        return iter(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


class OptimizerView:
    """What Hugging Face callbacks read of an optimizer, from ``state``: ``param_groups``.

    Examples:
        >>> tx = fx.optim.inject_hyperparams(fx.optim.sgd)(learning_rate=0.1, momentum=0.9)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), tx)
        >>> group, = OptimizerView(state).param_groups
        >>> round(group["lr"], 6), round(group["momentum"], 6), len(group["params"])
        (0.1, 0.9, 2)
    """

    def __init__(self, state: Any):
        self._state = state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One group: the parameters, ``"lr"`` and the injected hyperparameters, as floats."""
        found = dict(injected_hyperparams(self._state.opt_state))
        lr = found.pop("learning_rate", None)
        lr = learning_rate(self._state.opt_state) if lr is None else lr
        values = read_floats({**found, **({} if lr is None else {"lr": lr})})
        return [{"params": list(self._state.params.values()), **values}]


class SchedulerView:
    """``get_last_lr()`` of ``state``'s optimizer, as a torch scheduler has it.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.5))
        >>> SchedulerView(state).get_last_lr()
        [0.5]
    """

    def __init__(self, state: Any):
        self._optimizer = OptimizerView(state)

    def get_last_lr(self) -> list[float]:
        """The learning rate of the last update (the first one before any), in a list."""
        return [group["lr"] for group in self._optimizer.param_groups if "lr" in group]


def views(state: Any) -> dict[str, Any]:
    """The hooks' ``model``, ``optimizer`` and ``lr_scheduler`` keyword arguments for ``state``."""
    return {"model": LazyModule(lambda: trained_module(state)),
            "optimizer": OptimizerView(state), "lr_scheduler": SchedulerView(state)}
