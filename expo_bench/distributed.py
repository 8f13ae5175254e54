"""Ranks. Every rank runs the whole command (Lightning's model of distributed training), so every step with a side
effect either has one owner, global rank zero (:func:`on_rank_zero`: the others wait and receive its result), or is
sharded (:func:`map_sharded`: each rank its share of the work units, the results gathered in order on every rank).

The world starts before any work (:func:`start_world`), not at the first ``Trainer.fit``, so that the steps outside
training (SFT cache, reference samples and log-probs, evaluation) can be shared across ranks too. Without a world
(one process) every helper is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import distributed as dist

T = TypeVar("T")
U = TypeVar("U")

_objects: list[Any] = []
"""The process group that carries Python objects (gloo, whatever backend carries the tensors), once a world started."""


def start_world(accelerator: str, devices: int | str, num_nodes: int) -> int:
    """Join or create the world of ``num_nodes`` × ``devices`` processes that the recipe trains in; its size.

    Lightning's launcher decides how: under torchrun or SLURM every process exists already and joins; otherwise this
    process re-executes the command once per other local device (as ``Trainer.fit`` would, but before any work) and
    becomes local rank zero. Every later Trainer finds the process group connected and launches nothing.
    """
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    if fabric.world_size > 1 and not dist.is_initialized():
        fabric.launch()
        _objects.append(dist.new_group(backend="gloo"))
    return fabric.world_size


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """The global rank of this process (0 without a world)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_global_zero() -> bool:
    return rank() == 0


def _group() -> Any:
    return _objects[0] if _objects else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_group())


def broadcast(value: T) -> T:
    """Rank zero's ``value``, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def on_rank_zero(step: Callable[[], T]) -> T:
    """``step()`` run by rank zero alone; every rank returns its result (the others wait for it)."""
    return broadcast(step() if is_global_zero() else cast(T, None))


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank zero runs the block first (downloads, first writes), then the others run it (reading what it left)."""
    if not is_global_zero():
        barrier()
    yield
    if is_global_zero():
        barrier()


def map_sharded(units: Sequence[U], work: Callable[[int, U], T]) -> list[T]:
    """``[work(k, unit) for k, unit in enumerate(units)]``, each rank computing the units ``k ≡ rank (mod world)``
    and every rank receiving all results in order. ``work`` must not depend on which rank runs it."""
    mine = {k: work(k, units[k]) for k in range(rank(), len(units), world_size())}
    if not dist.is_initialized():
        return [mine[k] for k in range(len(units))]
    parts: list[dict[int, T]] = [{} for _ in range(world_size())]
    dist.all_gather_object(parts, mine, group=_group())
    merged = {k: value for part in parts for k, value in part.items()}
    return [merged[k] for k in range(len(units))]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (a collective, without gradient), or ``value`` itself without a world."""
    if not dist.is_initialized():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def accelerator_device() -> torch.device:
    """Where this rank runs work outside the Trainer: its own GPU if there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
