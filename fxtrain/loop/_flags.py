"""Control flags waiting to be read: the loop's one sync for every request made with tensors.

Callbacks and the step answer with ``Control`` values whose flags are Python bools (known now)
or 0-d bool tensors (computed on the device, known only after a sync). ``PendingFlags``
collects both without reading anything; ``read`` then reads every pending tensor flag in one
transfer (with whether a loss since the last read was not finite), agrees with the other ranks
when there are several, and turns a SIGTERM into a stop. ``fx.fit`` reads at its boundaries
(see ``fxtrain.loop._fit``).
"""

from __future__ import annotations

import torch

from .. import distributed
from ..protocol import HOST_FLAGS, IN_STEP_FLAGS, NOTHING, Control, control_from_metrics

# the flags a read returns and the ranks agree on, by name (``skip`` is acted on where raised)
READ_FLAGS = IN_STEP_FLAGS + HOST_FLAGS


def _no_tensors() -> dict[str, list[torch.Tensor]]:
    """An empty list of pending tensor flags per in-step flag name."""
    return {name: [] for name in IN_STEP_FLAGS}


class PendingFlags:
    """Control flags waiting to be read: Python bools at once, tensors in one later sync.

    Tensor flags are only collected per step; stacking and reducing them waits for ``read``.
    """

    def __init__(self, agree: bool = False):
        self.now, self.tensors = NOTHING, _no_tensors()  # tensor flags by in-step flag name
        self.agree = agree  # several ranks: reads are collective, so they happen in lockstep
        self.rank_consistent = False  # a request every rank made this step
        self.host_tensors = False  # a host callback answered with a tensor flag since the read
        self.signalled = False  # this process got SIGTERM (set by the handler)
        self.preempted = False  # a read found SIGTERM on some rank: every rank stops (and saves)
        self.losses: list[torch.Tensor] = []  # the steps' losses since the last read
        self.nonfinite_loss = False  # a read found a NaN or infinite loss among them

    def add(self, control: Control, alike: bool = False) -> None:
        """A fold's control; ``alike``: it holds a request from a callback that decides alike
        on every rank (see ``fold_reporting``), which the ranks act on at once."""
        self.rank_consistent = self.rank_consistent or alike
        if control is NOTHING:
            return
        values = {name: getattr(control, name) for name in IN_STEP_FLAGS}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                self.tensors[name].append(value)
                self.host_tensors = True
        self.now = self.now | Control(**{name: v is True for name, v in values.items()})
        host = {name: bool(getattr(control, name)) for name in HOST_FLAGS
                if getattr(control, name) is not False}
        if host:  # host only: acted on now
            self.now = self.now | Control(**host)

    def add_step(self, metrics: dict) -> None:
        """A step's metrics: its in-step callbacks' flags (tensors, kept for the next read, no
        Control merged per step) and its loss (checked at that read)."""
        control = control_from_metrics(metrics)
        if control is not NOTHING:
            for name in IN_STEP_FLAGS:
                self.tensors[name].append(getattr(control, name))
        if isinstance(metrics.get("loss"), torch.Tensor):
            self.losses.append(metrics["loss"])

    def urgent(self) -> bool:
        """A host callback asked for something now: with a Python True, or in one process with
        a tensor flag, which a host callback returns when it is due, so it is read at once as
        a bool would be acted on (in-step flags wait for ``sync_every``). One rank's wish
        cannot start a collective read alone, so several ranks wait for the next boundary."""
        if self.agree:
            return self.rank_consistent
        if self.now is NOTHING:  # per step, the common case
            return self.signalled or self.host_tensors
        return (any(getattr(self.now, name) for name in READ_FLAGS) or self.signalled
                or self.host_tensors)

    def read(self) -> Control:
        fields = [name for name in IN_STEP_FLAGS if self.tensors[name]]
        if fields:  # one sync for every pending flag, and whether a loss since was not finite
            device = self.tensors[fields[0]][0].device
            anys = [torch.stack([t.to(device) for t in self.tensors[name]]).any()
                    for name in fields]
            if self.losses:
                losses = torch.cat([loss.detach().reshape(-1).to(device) for loss in self.losses])
                anys.append(~torch.isfinite(losses).all())
            read = torch.stack(anys).tolist()
            self.nonfinite_loss = self.nonfinite_loss or (bool(self.losses) and read[-1])
            self.now = self.now | Control(**dict(zip(fields, read)))  # zip drops the loss's
        self.losses = []  # a boundary without a read (no flag pending) does not look at them
        out, self.now, self.tensors = self.now, NOTHING, _no_tensors()
        self.rank_consistent = self.host_tensors = False
        preempted = self.signalled
        if self.agree:  # a flag any rank raised holds on every rank
            *agreed, preempted = distributed.agree(
                [*(getattr(out, name) for name in READ_FLAGS), preempted])
            out = Control(**dict(zip(READ_FLAGS, agreed)))
        if preempted:  # stop; fit then saves, as at any end
            self.preempted = True
            out = out | Control(stop=True)
        return out
