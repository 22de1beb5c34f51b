"""A unit's flat buffer in an eager step (``fxtrain.distributed._unit_gather``), as FSDP2's: where
each of the unit's parameters sits in it (its rows per rank, padded to the same number on every
rank), the one all-gather of all the unit's shards into it (copied in to this rank's rows, copied
out into one whole tensor per parameter) and the one reduce-scatter of all its gradients."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._torch import collectives


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each parameter of a unit sits in its flat buffer: ``rows`` per rank (padded),
    ``shapes`` the whole ones; gathered in ``dtype`` (None: their own), reduce-scattered in
    ``reduce_dtype`` (None: ``dtype``'s) over ``mesh``."""

    mesh: Any
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype | None
    reduce_dtype: torch.dtype | None

    @property
    def world(self) -> int:
        return self.mesh.size()

    def rows(self, shape: tuple[int, ...]) -> int:
        return -(-shape[0] // self.world)

    def sizes(self) -> list[int]:
        """Each parameter's elements per rank, padded."""
        return [self.rows(s) * _inner(s) for s in self.shapes]

    def only(self, kept: list[int]) -> Plan:
        """This plan over the parameters at the indices ``kept`` (a unit's trained ones: the
        frozen ones' gradients are not reduce-scattered)."""
        return dataclasses.replace(self, shapes=tuple(self.shapes[i] for i in kept))

    def gathered(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole parameters of this rank's ``shards``: one all-gather, copied out."""
        return self.copied_out(self.issued(shards))

    def issued(self, shards: list[torch.Tensor]) -> Issued:
        """The all-gather of this rank's ``shards`` (each padded), under way. They are copied
        into this rank's rows of the gather's buffer, which the gather fills in place (FSDP2's
        copy-in): no buffer of the shards beside it."""
        dtype = self.dtype or shards[0].dtype
        sizes = self.sizes()
        flat = torch.empty((self.world, sum(sizes)), dtype=dtype, device=shards[0].device)
        mine = flat[self.mesh.get_local_rank()]
        torch.cat([padded(s.reshape(-1).to(dtype), n) for s, n in zip(shards, sizes)],
                  out=mine)
        return Issued(flat, collectives.all_gather_into(flat.view(-1), mine,
                                                        self.mesh.get_group()))

    def copied_out(self, issued: Issued) -> list[torch.Tensor]:
        """The whole parameters out of an ``issued`` all-gather's buffer (rank by rank, each
        parameter's rows): one copy into a buffer per parameter, as FSDP2's copy-out."""
        flat = issued.wait()
        sizes = self.sizes()
        out = [flat.new_empty((self.world, n)) for n in sizes]
        torch.split_with_sizes_copy(flat, sizes, dim=1, out=out)
        return [o.view(self.world * self.rows(shape), *shape[1:])[:shape[0]]
                for o, shape in zip(out, self.shapes)]

    def scattered(self, grads: tuple, like: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """This rank's part of the ``grads`` of the whole parameters (None: zeros) summed over
        the ranks, in one reduce-scatter (in ``reduce_dtype``), as the shards ``like`` are
        (their rows and dtype)."""
        given = next(g for g in grads if g is not None)
        dtype = self.reduce_dtype or self.dtype or like[0][1]
        sizes = self.sizes()
        columns = [given.new_zeros((self.world, n), dtype=dtype) if g is None else
                   padded(g.reshape(-1).to(dtype), self.world * n).view(self.world, n)
                   for g, n in zip(grads, sizes)]  # row r: what rank r's shards receive
        mine = collectives.wait_tensor(collectives.reduce_scatter_single(
            torch.cat(columns, dim=1).view(-1), "sum", 0, self.mesh))
        del columns
        out, at = [], 0
        for shape, n, (held, shard_dtype) in zip(self.shapes, sizes, like):
            out.append(mine[at:at + n].view(self.rows(shape), *shape[1:])[:held].to(shard_dtype))
            at += n
        return out


@dataclasses.dataclass(frozen=True)
class Issued:
    """An all-gather under way: its buffer (a row per rank), and the work to wait on."""

    flat: torch.Tensor
    work: Any

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.flat


def padded(flat: torch.Tensor, n: int) -> torch.Tensor:
    """``flat`` (1-D) padded with zeros to ``n`` elements (as it is when it has them)."""
    return flat if flat.numel() == n else torch.nn.functional.pad(flat, (0, n - flat.numel()))


def _inner(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def plan_of(params: list[Any], gather: Any) -> Plan:
    """The plan of a unit of whole ``params`` (DTensors) on their mesh, in ``gather``'s dtypes."""
    return Plan(params[0].device_mesh, tuple(tuple(p.shape) for p in params),
                gather.param_dtype, gather.reduce_dtype)
