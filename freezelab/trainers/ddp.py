"""What the ranks of a run share: the DDP wrapper, sums and averages across ranks, the
replica check (and the error of replicas that disagree), and where each rank runs. On
one rank (or without a process group) every function here is the identity or its
one-rank answer, so the loop calls them unconditionally.

>>> import torch
>>> model = torch.nn.Linear(2, 2)
>>> wrap(model, world_size=1, device=torch.device("cpu")) is model, replicas_in_sync(model, 1)
(True, 1)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from freezelab.errors import FreezelabError
from freezelab.policies.groups import LayerGroup, group_of_module


class SingleProcess:
    """The Train context of a run in one process: rank 0 of 1."""

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0

    def get_node_rank(self) -> int:
        return 0


def wrap(module: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    if world_size <= 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # Every trainable parameter of every policy takes part in the forward pass, so
    # DDP's slow unused-parameter search stays off.
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def placement(context, device: torch.device) -> list[dict[str, Any]]:
    """Where each rank runs (ranks, Ray node id, IP, hostname, device), gathered on every
    rank. Ray Train's node_rank comes from the IP address; the node id also tells apart
    Ray nodes that share one machine."""
    import socket

    import ray

    rank, world_size = context.get_world_rank(), context.get_world_size()
    me = {
        "rank": rank,
        "local_rank": context.get_local_rank(),
        "node_rank": context.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "node_ip": ray.util.get_node_ip_address() if ray.is_initialized() else None,
        "hostname": socket.gethostname(),
        "device": str(device),
    }
    if world_size == 1:
        return [me]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, me)
    return sorted(gathered, key=lambda w: w["rank"])


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def per_rank(value: torch.Tensor, rank: int, world_size: int) -> list[float]:
    """Every rank's ``value`` (a scalar tensor), by rank, on every rank: a sum across
    ranks of a vector that holds this rank's value at its own index.

    >>> per_rank(torch.tensor(36.0), rank=0, world_size=1)
    [36.0]
    """
    values = torch.zeros(world_size, dtype=torch.float64, device=value.device)
    values[rank] = value
    return all_reduce(values).tolist()


@torch.no_grad()
def average_buffers(model: nn.Module, world_size: int) -> None:
    """Average every floating-point buffer (BatchNorm's running statistics) across
    ranks, as timm's ``distribute_bn(..., reduce=True)`` does. DDP broadcasts rank 0's
    buffers at each forward, then each rank updates them on its own batch, so after the
    last step they differ. Averaging keeps the statistics of every rank's data, where
    broadcasting rank 0's would keep a single shard's. Identical buffers stay exact."""
    if world_size <= 1 or not dist.is_initialized():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            # In float64, so buffers that agree stay bit-exact for any number of ranks.
            total = buffer.double()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            buffer.copy_(total / world_size)


def replicas_in_sync(model: nn.Module, world_size: int) -> int:
    """1 when every rank holds bit-identical parameters and buffers (BatchNorm's
    statistics too), else 0 (always 1 on one rank)."""
    return int(not differing_tensors(model, world_size))


@torch.no_grad()
def differing_tensors(model: nn.Module, world_size: int) -> list[str]:
    """The names of the parameters and buffers whose bits differ between ranks: the
    same list on every rank, since each compares every rank's checksums (empty on one
    rank).

    The checksum sums each tensor's bytes as integers: equal bits give equal sums.
    """
    if world_size <= 1 or not dist.is_initialized():
        return []
    named = [*model.named_parameters(), *model.named_buffers()]
    sums = torch.stack(
        [
            t.detach().reshape(-1).contiguous().view(torch.uint8).to(torch.int64).sum()
            for _, t in named
        ]
    ).to(torch.int64)
    gathered = [torch.empty_like(sums) for _ in range(world_size)]
    dist.all_gather(gathered, sums)
    differs = torch.stack([other != gathered[0] for other in gathered[1:]]).any(0)
    return [name for (name, _), flag in zip(named, differs.tolist(), strict=True) if flag]


def groups_holding(names: list[str], groups: tuple[LayerGroup, ...]) -> list[str]:
    """The layer groups, input to output, that hold the parameters or buffers
    ``names`` (a buffer belongs to the group of its module); a name in no group stands
    for itself, after them."""
    found: list[str] = []
    loose: list[str] = []
    for name in names:
        group = next((g for g in groups if name in g.param_names), None)
        group = group or group_of_module(groups, name.rpartition(".")[0])
        if group is None:
            loose.append(name)
        elif group.name not in found:
            found.append(group.name)
    order = [g.name for g in groups]
    return sorted(found, key=order.index) + loose


class ReplicasDivergedError(FreezelabError):
    """The ranks of a data-parallel run no longer hold the same model: a failure of the
    run (exit code 1), raised on every rank after the epoch's report, so that no model
    is handed over.

    >>> print(ReplicasDivergedError(1, 3, ["layer3", "layer4"]))  # doctest: +ELLIPSIS
    epoch 2/3: the ranks' replicas no longer agree: ... in layer group(s) layer3, layer4; ...
    """

    exit_code = 1

    def __init__(self, epoch: int, epochs: int, groups: list[str]):
        self.epoch, self.epochs, self.groups = epoch, epochs, list(groups)
        super().__init__(
            f"epoch {epoch + 1}/{epochs}: the ranks' replicas no longer agree: parameters or "
            f"buffers differ between ranks in layer group(s) {', '.join(self.groups)}; no model "
            "is handed over"
        )

    def __reduce__(self):
        # Ray Train pickles a worker's exception to the driver: rebuilt from its fields.
        return (type(self), (self.epoch, self.epochs, self.groups))
