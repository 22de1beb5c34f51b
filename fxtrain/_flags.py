"""Control flags waiting to be read: the loop's one sync for every request made with tensors.

Callbacks and the step answer with ``Control`` values whose flags are Python bools (known now)
or 0-d bool tensors (computed on the device, known only after a sync). ``PendingFlags``
collects both without reading anything; ``read`` then reads every pending tensor flag in one
transfer (with whether a loss since the last read was not finite), agrees with the other ranks
when there are several, and turns a SIGTERM into a stop. ``fx.fit`` reads at its boundaries
(see ``fxtrain.loop``).
"""

from __future__ import annotations

import torch

from . import distributed
from .protocol import NOTHING, Control, control_from_metrics, flags


class PendingFlags:
    """Control flags waiting to be read: Python bools at once, tensors in one later sync.

    Tensor flags are only collected per step; stacking and reducing them waits for ``read``.
    """

    def __init__(self, agree: bool = False):
        self.now, self.tensors = NOTHING, ([], [], [], [])  # stop, save, evaluate, log
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
        values = flags(control)[:4]
        for pending, value in zip(self.tensors, values):
            if isinstance(value, torch.Tensor):
                pending.append(value)
                self.host_tensors = True
        self.now = self.now | Control(*(v if v is True else False for v in values))
        if control.stop_epoch is not False or control.abort is not False:  # host only: now
            self.now = self.now | Control(stop_epoch=bool(control.stop_epoch),
                                          abort=bool(control.abort))

    def add_step(self, metrics: dict) -> None:
        """A step's metrics: its in-step callbacks' flags (tensors, kept for the next read, no
        Control merged per step) and its loss (checked at that read)."""
        control = control_from_metrics(metrics)
        if control is not NOTHING:
            for pending, value in zip(self.tensors, flags(control)):
                pending.append(value)
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
        return bool(self.now.stop or self.now.save or self.now.evaluate or self.now.log
                    or self.now.stop_epoch or self.now.abort or self.signalled
                    or self.host_tensors)

    def read(self) -> Control:
        fields = [i for i, pending in enumerate(self.tensors) if pending]
        if fields:  # one sync for every pending flag, and whether a loss since was not finite
            device = self.tensors[fields[0]][0].device
            anys = [torch.stack([t.to(device) for t in self.tensors[i]]).any() for i in fields]
            if self.losses:
                losses = torch.cat([loss.detach().reshape(-1).to(device) for loss in self.losses])
                anys.append(~torch.isfinite(losses).all())
            read = torch.stack(anys).tolist()
            self.nonfinite_loss = self.nonfinite_loss or (bool(self.losses) and read[-1])
            read = dict(zip(fields, read))
            self.now = self.now | Control(*(read.get(i, False) for i in range(4)))
        self.losses = []  # a boundary without a read (no flag pending) does not look at them
        out, self.now, self.tensors = self.now, NOTHING, ([], [], [], [])
        self.rank_consistent = self.host_tensors = False
        preempted = self.signalled
        if self.agree:  # a flag any rank raised holds on every rank
            *agreed, preempted = distributed.agree([*flags(out)[:4], out.stop_epoch, out.abort,
                                                    preempted])
            out = Control(*agreed[:4], stop_epoch=agreed[4], abort=agreed[5])
        if preempted:  # stop; fit then saves, as at any end
            self.preempted = True
            out = out | Control(stop=True)
        return out
