"""What one rank reads: its batches to train on, to validate and to test, and the
order of its training rows as a function of (seed, epoch), from a seeded DataLoader
(prepared by Ray Train) or from this rank's Ray Data shards. Every batch is
``(images, labels, row indices)``: the feature cache is keyed by the row index.

>>> [row[1:] for row in Indexed([("a", 0), ("b", 1)])]
[(0, 0), (1, 1)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
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
    # single process, so the order of samples depends only on (seed, epoch). Ray keeps
    # any DistributedSampler (a subclass included) that the loader already has.
    if config.data.epoch_fraction is None:
        sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed
        )
    else:
        sampler = EpochSubsetSampler(
            train_set, config.data.epoch_fraction, world_size, rank, seed=config.seed
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


def subset_size(fraction: float, rows: int) -> int:
    """The rows an epoch draws: ``ceil(fraction * rows)``, at least one, and immune to
    float noise (``0.07 * 100`` is ``7.000000000000001``).

    >>> subset_size(0.5, 7), subset_size(0.07, 100), subset_size(1.0, 7)
    (4, 7, 7)
    """
    return max(1, math.ceil(round(fraction * rows, 9)))


class EpochSubsetSampler(DistributedSampler):
    """A DistributedSampler that trains each epoch on a fresh random subset of
    ``subset_size(fraction, len(dataset))`` rows: the first rows of the permutation
    seeded by ``seed + epoch`` (DistributedSampler's own), strided across ranks and
    padded to equal shares as DistributedSampler does. The subset is drawn before it is
    split, so every rank draws the same one, and it depends on (seed, epoch) alone: a
    resumed run draws what the uninterrupted run drew. The indices are those of the
    whole dataset. With ``fraction=1`` the order is DistributedSampler's.

    >>> sampler = EpochSubsetSampler(range(10), 0.5, num_replicas=2, rank=0, seed=0)
    >>> len(sampler), len(set(sampler) | set(EpochSubsetSampler(range(10), 0.5, 2, 1)))
    (3, 5)
    """

    def __init__(
        self, dataset: Dataset, fraction: float, num_replicas: int, rank: int, seed: int = 0
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.subset_size = subset_size(fraction, len(dataset))
        self.num_samples = math.ceil(self.subset_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        chosen = torch.randperm(len(self.dataset), generator=generator)[: self.subset_size]
        indices = chosen.tolist()
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


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
