"""What one rank reads: its batches to train on, to validate and to test, and the
order of its training rows as a function of (seed, epoch), from a seeded DataLoader
(prepared by Ray Train) or from this rank's Ray Data shards. Every batch is
``(images, labels, row indices)``: the feature cache is keyed by the row index.

>>> [row[1:] for row in Indexed([("a", 0), ("b", 1)])]
[(0, 0), (1, 1)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from freezelab.trainers import ray_data
from freezelab.trainers.config import TrainConfig


@dataclass(frozen=True)
class RankData:
    """What one rank reads: batches of ``(images, labels, row indices)`` to train on and
    to validate, and the order of its training rows, a function of (seed, epoch)."""

    train: Iterable[Any]
    val: Iterable[Any]
    # This rank's stride of the held-out test set (key "") and of its shifted copies
    # (key: the shift), by the suffix of their metric; empty without a test set.
    tests: dict[str, Iterable[Any]]
    train_size: int  # rows of the whole training set: the feature cache's keys
    val_size: int  # rows of this rank's validation shard
    rows_per_epoch: int  # this rank's training rows in an epoch
    set_epoch: Callable[[int], None]
    cached_order: Callable[[], Iterable[int]]  # the epoch's rows, for cached features


def rank_data(
    config: TrainConfig,
    shards: dict[str, Any] | None,
    train_set: Dataset | None,
    val_set: Dataset,
    test_sets: dict[str, Dataset],
    rank: int,
    world_size: int,
    eval_batch: int,
    in_process: bool,
) -> RankData:
    if shards is not None:
        # Ray Data: its order per epoch is seeded as the sampler's is (ray_data.py says
        # what stays exact on resume).
        train, val, test = ray_data.rank_batches(
            shards, rank, world_size, config.batch_size, eval_batch, config.seed
        )
        return RankData(
            train=train,
            val=val,
            tests={"": test} if test is not None else {},
            train_size=shards["train_size"],
            val_size=len(val.rows),
            rows_per_epoch=len(train.rows),
            set_epoch=train.set_epoch,
            cached_order=train.cached_order,
        )
    import ray.train.torch

    # Ray's own sampler ignores the run's seed; this one is seeded and also used on a
    # single process, so the order of samples depends only on (seed, epoch).
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed
    )
    train = DataLoader(
        Indexed(train_set),
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
    )
    if not in_process:
        train = ray.train.torch.prepare_data_loader(train)
    # A disjoint stride of the validation set per rank: the whole set, no padding.
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val = DataLoader(Indexed(val_shard), batch_size=eval_batch, num_workers=config.data.num_workers)
    return RankData(
        train=train,
        val=val,
        tests=eval_loaders(test_sets, rank, world_size, eval_batch, config.data.num_workers),
        train_size=len(train_set),
        val_size=len(val_shard),
        rows_per_epoch=len(sampler),
        set_epoch=sampler.set_epoch,
        cached_order=lambda: sampler,
    )


class Indexed(Dataset):
    """Adds the dataset index to each item: the feature cache is keyed by it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def eval_loaders(
    eval_sets: dict[str, Dataset], rank: int, world_size: int, batch_size: int, num_workers: int
) -> dict[str, DataLoader]:
    """A loader of this rank's disjoint stride of each extra evaluation set (no padding)."""
    return {
        name: DataLoader(
            Indexed(torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        for name, dataset in eval_sets.items()
    }
