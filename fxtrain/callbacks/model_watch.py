"""``model_watch``: histograms and norms of parameters and gradients, every N steps.

Everything is binned and reduced on device and read in one transfer per due step; between due
steps the fold does not call it. Parameters come from the state. Gradients exist only inside
the step, so their norms and histograms come from the step's metrics: build the step with
``make_train_step(..., grad_stats=True)`` for the norms, or ``grad_stats="histograms"`` for the
norms and the histograms (a pass over the gradients every step; see ``make_train_step``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..logging.values import Histogram
from ..stats import histograms
from ..tree import squared_norms
from .combinators import every as every_n
from .combinators import rank_zero
from .core import NOTHING, Callback
from ..logging.writer import check_writer, takes_binned_histograms

_LOG = ("gradients", "parameters", "all")


def model_watch(writer: Any, log: str = "gradients", every: int = 500, *,
                name: str = "model_watch") -> Callback:
    """Writes histograms and norms of the parameters and/or gradients every ``every`` steps.

    Writes ``parameters/<name>`` and ``gradients/<name>`` histograms and
    ``parameters/norm/<name>`` and ``gradients/norm/<name>`` scalars. Runs on rank 0 only.

    Args:
      writer: a writer with ``write_histograms`` and ``write_scalars``. fxtrain's writers take
        the histograms binned; other writers (clu's) get up to 100k bin-centre samples.
      log: "gradients", "parameters" or "all".
      every: steps between writes.
      name: the callback's name.

    Gradients need the step built with ``make_train_step(..., grad_stats=True)`` (norms); with
    ``grad_stats="histograms"`` their histograms are written too, and without it a warning says
    so once.

    Examples:
        >>> def loss_fn(state, params, batch):
        ...     x, y = batch
        ...     return ((state.apply(params, x) - y) ** 2).mean()
        >>> class Show:
        ...     binned_histograms = True  # takes fx.logging.Histogram values
        ...     def write_scalars(self, step, scalars):
        ...         print(step, sorted(scalars))
        ...     def write_histograms(self, step, arrays, num_buckets=None):
        ...         print(step, {k: type(v).__name__ for k, v in arrays.items()})
        >>> x = torch.randn(32, 2)
        >>> state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
        >>> train_step = fx.make_train_step(loss_fn, grad_stats="histograms")
        >>> state = fx.fit(state, train_step, fx.data.Batches((x, x.sum(1, keepdim=True)), 4),
        ...                max_steps=2, callbacks=[fx.callbacks.model_watch(Show(), "all", 2)])
        2 ['gradients/norm/bias', 'gradients/norm/weight', 'parameters/norm/bias',
           'parameters/norm/weight']
        2 {'parameters/weight': 'Histogram', 'parameters/bias': 'Histogram',
           'gradients/weight': 'Histogram', 'gradients/bias': 'Histogram'}
    """
    if log not in _LOG:
        raise ValueError(f"model_watch: log must be one of {_LOG}, got {log!r}")
    check_writer(writer, "model_watch", "write_histograms", "write_scalars")
    warned = []

    def gradients(metrics) -> tuple[dict, dict]:
        norms = {k.removeprefix("grad_norm/"): v for k, v in metrics.items()
                 if k.startswith("grad_norm/")}
        if not norms:
            raise KeyError("model_watch: the step reports no per-parameter gradient norms; build "
                           "it with make_train_step(..., grad_stats=True), or grad_stats="
                           "'histograms' for gradient histograms too. Available metrics: "
                           f"{sorted(metrics)}")
        hists = {k.removeprefix("grad_hist/"): v for k, v in metrics.items()
                 if k.startswith("grad_hist/")}
        if not hists and not warned:
            warned.append(True)
            warnings.warn("model_watch: writing gradient norms only; build the step with "
                          "make_train_step(..., grad_stats='histograms') for gradient histograms",
                          stacklevel=4)
        return norms, hists

    def fn(state, event):
        norms, hists = {}, {}
        if log in ("parameters", "all"):
            params = {k: v.detach() for k, v in state.params.items()}
            squared = squared_norms(list(params.values()))
            norms.update({f"parameters/norm/{k}": torch.sqrt(s) for k, s in zip(params, squared)})
            hists.update({f"parameters/{k}": v for k, v in histograms(params).items()})
        if log in ("gradients", "all"):
            grad_norms, grad_hists = gradients(event.metrics or {})
            norms.update({f"gradients/norm/{k}": v for k, v in grad_norms.items()})
            hists.update({f"gradients/{k}": v for k, v in grad_hists.items()})
        norm_values, packed = _read(norms, hists)  # one transfer
        binned = {k: Histogram.from_packed(v) for k, v in packed.items()}
        if not takes_binned_histograms(writer):
            binned = {k: h.samples() for k, h in binned.items()}
        writer.write_scalars(event.step, norm_values)
        if binned:
            writer.write_histograms(event.step, binned)
        return state, NOTHING

    return rank_zero(every_n(every, Callback(name, None, fn, kinds=("step_end",), host=True)))


def _read(norms: dict[str, torch.Tensor], hists: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Python floats of ``norms`` and numpy rows of ``hists``, in one device-to-host copy."""
    flat = [t.detach().reshape(-1).to(torch.float32) for t in [*norms.values(), *hists.values()]]
    if not flat:
        return {}, {}
    device = flat[0].device
    host = torch.cat([t.to(device) for t in flat]).cpu().numpy()
    out_norms, out_hists, at = {}, {}, 0
    for k in norms:
        out_norms[k] = float(host[at])
        at += 1
    for k, t in hists.items():
        out_hists[k] = host[at:at + t.numel()]
        at += t.numel()
    return out_norms, out_hists
