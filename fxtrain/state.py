"""``TrainState``: the whole training run as one immutable pytree value.

The parameters and buffers live in the state only. ``TrainState.create`` copies them out of the
model and keeps a weightless *skeleton* of it (the same module structure, its tensors on the
meta device) to run through ``torch.func.functional_call``: the state holds the one copy of the
weights that training updates, and the model passed in is left as it was (drop your reference
to free its weights).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any
import warnings

import torch
from torch import nn

from . import _held, optim, random, struct
from .distributed import Layout, for_forward, frozen_for_forward
from .protocol import init_states
from .donation import check_live
from .optim._on_shards import on_shards
from .optim.fused import apply_fused
from .optim.base import GradientTransformation, apply_updates, update_weighted
from .tree import check_same_structure


class StepBuffers(dict):
    """Buffers that one forward inside a train step owns (fresh clones): ``apply`` hands them to
    the module as they are, so in-place updates (BatchNorm statistics) land in that copy and
    the step reads them back as the new buffers. Any other buffers are cloned per ``apply``."""


def with_step_buffers(state: TrainState) -> TrainState:
    """``state`` with its buffers cloned into a ``StepBuffers`` that ``apply`` may update; the
    frozen parameters (``Layout.frozen``, which nothing writes) as they are."""
    if state.buffers is None:
        return state
    return state.replace(buffers=StepBuffers(_cloned(state.buffers, state.layout.frozen)))


def _cloned(buffers: dict[str, torch.Tensor], frozen: tuple[str, ...]) -> dict:
    """``buffers`` cloned but for the ``frozen`` parameters among them."""
    return {k: v if k in frozen else v.clone() for k, v in buffers.items()}


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
        else meta


def refuse_direct_call(module: nn.Module, args: Any) -> None:
    del args
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.is_meta:
        raise RuntimeError(
            f"this {type(module).__name__} is the weightless skeleton of a TrainState (its "
            "tensors are on the meta device); run it with state.apply(state.params, ...), or "
            "take the trained model out with fx.trained_module(state)")


def set_training(module: torch.nn.Module, training: bool) -> bool:
    """Puts ``module`` in train or eval mode if it is not already; returns the old mode.

    Left alone when already right, so a compiled step has no side effects to replay.
    """
    was = module.training
    if was != training:
        module.train(training)
    return was


def skeleton(model: nn.Module) -> tuple[nn.Module, Any]:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no storage;
    tied tensors stay tied), for ``functional_call``, and the handle of its guard: calling it
    directly is a clear error (None: ``model`` itself, which could not be copied)."""
    memo = {id(t): _meta_like(t) for t in itertools.chain(model.parameters(), model.buffers())}
    try:
        out = copy.deepcopy(model, memo)
    except Exception as e:  # a module holding something deepcopy cannot copy
        warnings.warn(f"TrainState.create: {type(model).__name__} cannot be copied without its "
                      f"weights ({e}); the state uses the model itself, which keeps a second "
                      "copy of the initial weights", stacklevel=3)
        return model, None
    return out, Guard(out.register_forward_pre_hook(refuse_direct_call))


class Guard:
    """The skeleton's guard against being called directly, as the state's layout keeps it:
    ``remove()`` takes it off (the trained module, a copy, goes without it). It holds torch's
    ``RemovableHandle`` rather than being one: torch 2.11's Dynamo cannot represent a handle
    made outside the traced frame, and it meets the layout whenever a compiled step returns
    its state ("Attempted to represent unregistered RemovableHandle")."""

    def __init__(self, handle: Any):
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()


def layout_of(skeleton_: nn.Module, guard: Any) -> Layout:
    """The layout of a state of the skeleton ``skeleton_`` (one process, or data parallel): its
    tied names (``state.apply`` binds them; None without a ``guard``: the model itself, which
    ``functional_call`` ties), whether it checkpoints its own activations, the guard's handle."""
    tied = None if guard is None else _held.tied_names(skeleton_)
    frozen = tuple(n for n, p in skeleton_.named_parameters() if not p.requires_grad)
    return Layout(tied=tied, checkpointing=_held.checkpointing(skeleton_), guard=guard,
                  frozen=frozen)


# torch.optim's optimizers and the fxtrain transforms that compute the same update
_TORCH_OPTIM = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "RMSprop": "rmsprop",
                "Adagrad": "adagrad", "Adadelta": "adadelta", "Adamax": "adamax",
                "NAdam": "nadam", "RAdam": "radam", "Rprop": "rprop", "LBFGS": "lbfgs"}


def _torch_optim_fix(optimizer: Any) -> str:
    """The fxtrain call for a ``torch.optim`` optimizer (instance or class), as far as known."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    name = _TORCH_OPTIM.get(cls.__name__)
    if name is None or not hasattr(optim, name):
        return "an fx.optim transform (see fx.optim: optax's names)"
    defaults = getattr(optimizer, "defaults", None)
    if not isinstance(defaults, dict):
        return f"fx.optim.{name}(learning_rate, ...)"
    lr = defaults.get("lr", "learning_rate")
    lr = float(lr) if isinstance(lr, torch.Tensor) else lr
    extra = ""
    if "betas" in defaults and name in ("adam", "adamw", "nadam", "radam", "adamax"):
        extra += f", b1={defaults['betas'][0]}, b2={defaults['betas'][1]}"
    if defaults.get("weight_decay") and name != "sgd":
        extra += f", weight_decay={defaults['weight_decay']}"
    if name == "sgd" and defaults.get("momentum"):
        extra += f", momentum={defaults['momentum']}"
    return f"fx.optim.{name}({lr}{extra})"


def _class_name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def check_transform(tx: Any) -> None:
    """Refuses what is not a ``GradientTransformation`` (an ``(init, update)`` pair), naming the
    fxtrain call for a ``torch.optim`` optimizer and the call an uncalled factory needs."""
    if isinstance(tx, GradientTransformation) or (
            callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        return
    if isinstance(tx, torch.optim.Optimizer) or (
            isinstance(tx, type) and issubclass(tx, torch.optim.Optimizer)):
        raise TypeError(
            f"TrainState.create needs an fxtrain optimizer, a pure (init, update) pair whose "
            f"state lives in the TrainState; got torch.optim.{_class_name(tx)}, which updates a "
            f"module's parameters in place. Use {_torch_optim_fix(tx)}")
    if callable(tx) and getattr(tx, "__module__", "").startswith("fxtrain.optim"):
        raise TypeError(f"TrainState.create got the function fx.optim.{tx.__name__} itself; call "
                        f"it: fx.optim.{tx.__name__}(learning_rate, ...)")
    raise TypeError(f"TrainState.create needs an fxtrain optimizer (fx.optim.adamw(1e-3), or any "
                    f"GradientTransformation(init, update)); got {type(tx).__name__}")


@struct.dataclass(kw_only=True)
class TrainState:
    """Step counter, parameters, buffers, optimizer state, RNG key, data position and callback
    states, as one frozen value. ``module`` (a weightless skeleton of the model), ``tx`` and
    ``layout`` (how the model is laid out over the ranks: ``fx.distributed.Layout``, which
    ``fx.shard`` replaces) are static: part of the structure, not leaves, and never saved in
    checkpoints.

    Examples:
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1), seed=0)
        >>> int(state.step), sorted(state.params)
        (0, ['bias', 'weight'])
        >>> grads = {name: torch.ones_like(p) for name, p in state.params.items()}
        >>> new = state.apply_gradients(grads)
        >>> int(new.step), int(state.step)
        (1, 0)
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] | None
    opt_state: Any
    rng: torch.Tensor
    data: Any = None
    callbacks: dict[str, Any] | None = None
    module: nn.Module = struct.field(static=True, repr=False)
    tx: GradientTransformation = struct.field(static=True, repr=False)
    layout: Layout = struct.field(static=True, repr=False, default=Layout())

    @classmethod
    def create(cls, model: nn.Module, tx: GradientTransformation, *, seed: int = 0,
               callbacks: Sequence[Callable] = ()) -> TrainState:
        """A fresh state: copies of ``model``'s trainable parameters and of its buffers (frozen
        parameters count as buffers), ``tx.init(params)``, step 0 and the key of ``seed``.

        ``model`` itself is not changed; the state keeps a weightless skeleton of it
        (``state.module``), so the copies in the state are the only weights it holds.

        Examples:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
            >>> state = fx.TrainState.create(model, fx.optim.adamw(1e-3), seed=0)
            >>> sorted(state.params)
            ['0.bias', '0.weight', '1.bias', '1.weight', '2.bias', '2.weight']
            >>> sorted(state.buffers)  # BatchNorm's statistics
            ['1.num_batches_tracked', '1.running_mean', '1.running_var']
            >>> state.step, state.rng.dtype
            (tensor(0), torch.int64)
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainState.create needs an nn.Module, got {type(model).__name__}")
        check_transform(tx)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters "
                             "(none with requires_grad=True); there is nothing to train")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {**frozen, **{n: b.detach().clone() for n, b in model.named_buffers()}}
        device = next(iter(params.values())).device
        module, guard = skeleton(model)
        layout = layout_of(module, guard)
        tx = optim.masks.with_tied(tx, layout.tied)  # a mask may name either of two tied names
        opt_state = tx.init(params)
        state = cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            params=params,
            buffers=buffers or None,
            opt_state=opt_state,
            rng=random.seed_key(seed, device),
            module=module,
            tx=tx,
            layout=layout,
        )
        return state.replace(callbacks=init_states(callbacks, state))

    def apply(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Runs the module with ``params`` and this state's buffers; the state is not changed.

        Examples:
            >>> state = fx.TrainState.create(nn.Linear(3, 2), fx.optim.sgd(0.1))
            >>> state.apply(state.params, torch.ones(4, 3)).shape
            torch.Size([4, 2])
            >>> zeros = {name: torch.zeros_like(p) for name, p in state.params.items()}
            >>> state.apply(zeros, torch.ones(1, 3))
            tensor([[0., 0.]])
        """
        # a sharded state's parameters whole, but for those its units gather (fx.shard's)
        params = for_forward(params, self.layout)
        buffers = self.buffers
        if buffers is not None and type(buffers) is not StepBuffers:  # keep this state's intact
            buffers = _cloned(buffers, self.layout.frozen)
        if buffers is not None:  # a sharded state's frozen parameters as its parameters are
            buffers = frozen_for_forward(buffers, self.layout)
        tensors = params if buffers is None else {**params, **buffers}
        return _held.call(self.module, tensors, args, kwargs, self.layout.tied)

    def apply_gradients(self, grads: dict[str, torch.Tensor], *,
                        weight: torch.Tensor | None = None, donated: bool = False) -> TrainState:
        """One optimizer update: a new state with step + 1, new params and optimizer state.
        ``weight`` (the items the gradient averages over, from ``fx.losses.Mean``) goes to an
        optimizer that accumulates by it (``fx.optim.multi_steps``; see
        ``fx.optim.update_weighted``). ``donated``: the caller gives this state up (an eager
        donating step, ``fxtrain.donation``), so the optimizer writes its new state and the new
        parameters into this state's tensors as it goes, as ``torch.optim`` does
        (``fx.optim.base.InPlace``): the same bits, without a second copy of the state.

        Examples:
            >>> state = fx.TrainState.create(nn.Linear(1, 1, bias=False), fx.optim.sgd(0.5))
            >>> state = state.replace(params={"weight": torch.tensor([[1.0]])})
            >>> new = state.apply_gradients({"weight": torch.tensor([[2.0]])})
            >>> new.params["weight"], int(new.step), state.params["weight"]
            (tensor([[0.]]), 1, tensor([[1.]]))
        """
        check_live(self, "apply_gradients")
        check_same_structure(self.params, grads, "the gradients")
        in_place = optim.base.InPlace(self.opt_state, self.params) if donated else None
        # eager, AdamW runs fused and a sharded state's update on its local shards; compiled,
        # Inductor fuses the update and Dynamo traces DTensor's ops into plain ones
        eager = not torch.compiler.is_compiling()
        fused = apply_fused(self.tx, grads, self.opt_state, self.params, weight, in_place) \
            if eager else None
        if fused is not None:  # eager AdamW: torch.optim's foreach ops
            params, opt_state = fused
            return self.replace(step=self.step + 1, params=params, opt_state=opt_state)
        local = on_shards(self.tx, grads, self.opt_state, self.params, in_place) \
            if eager else None
        updates, opt_state = local or update_weighted(self.tx, grads, self.opt_state, self.params,
                                                      weight, in_place=in_place)
        params = apply_updates(self.params, updates, in_place=in_place)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def init_opt_state(self, params: dict[str, torch.Tensor]) -> Any:
        """``self.tx.init(params)`` (its masks read this state's tied names: ``create`` made it
        so): the optimizer state of ``params`` (``fx.shard`` lays the state's out like the one
        this gives for the sharded parameters)."""
        return self.tx.init(params)
