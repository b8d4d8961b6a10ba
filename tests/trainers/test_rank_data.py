"""What a rank reads: the sampler of ``data.epoch_fraction`` (a fresh seeded subset of the
training rows each epoch, drawn before the ranks split it)."""

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from freezelab.trainers.rank_data import EpochSubsetSampler, subset_size

ROWS = list(range(50))


def _ranks(fraction: float, world_size: int, epoch: int, seed: int = 0) -> list[list[int]]:
    """Each rank's rows of ``epoch``, from a sampler built anew (as a resumed run does)."""
    strides = []
    for rank in range(world_size):
        sampler = EpochSubsetSampler(ROWS, fraction, world_size, rank, seed=seed)
        sampler.set_epoch(epoch)
        strides.append(list(sampler))
        assert len(sampler) == len(strides[-1])
    return strides


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_an_epoch_is_the_same_subset_on_any_number_of_ranks(world_size):
    subset = _ranks(0.3, 1, epoch=2)[0]
    assert len(subset) == len(set(subset)) == 15  # ceil(0.3 * 50)
    strides = _ranks(0.3, world_size, epoch=2)
    # Equal shares, padded with the subset's first rows as DistributedSampler pads.
    share = -(-15 // world_size)
    assert [len(stride) for stride in strides] == [share] * world_size
    rows = [row for stride in strides for row in stride]
    assert set(rows) == set(subset)
    padding = Counter(rows) - Counter(subset)
    assert sum(padding.values()) == share * world_size - 15
    assert set(padding) <= set(subset[: share * world_size - 15])
    # Round robin: the ranks' rows, interleaved, are the single process's order.
    interleaved = [strides[i % world_size][i // world_size] for i in range(15)]
    assert interleaved == subset


def test_ranks_take_disjoint_strides_when_the_subset_divides_evenly():
    strides = _ranks(0.3, 3, epoch=0)  # 15 rows, 5 per rank
    assert all(len(stride) == 5 for stride in strides)
    assert len(set().union(*map(set, strides))) == 15


def test_each_epoch_draws_a_new_subset_that_depends_only_on_seed_and_epoch():
    epochs = [set(_ranks(0.3, 1, epoch)[0]) for epoch in range(6)]
    assert len({frozenset(rows) for rows in epochs}) == 6
    assert _ranks(0.3, 2, epoch=4) == _ranks(0.3, 2, epoch=4)
    assert _ranks(0.3, 2, epoch=4, seed=1) != _ranks(0.3, 2, epoch=4)
    # Over the epochs the run sees far more of the data than one fixed subset of 15.
    assert len(set().union(*epochs)) > 30


def test_the_whole_fraction_is_distributed_samplers_order():
    for rank in range(2):
        ours = EpochSubsetSampler(ROWS, 1.0, 2, rank, seed=7)
        theirs = DistributedSampler(ROWS, num_replicas=2, rank=rank, shuffle=True, seed=7)
        ours.set_epoch(3)
        theirs.set_epoch(3)
        assert list(ours) == list(theirs)


@pytest.mark.parametrize(
    ("fraction", "rows", "expected"),
    [(0.5, 7, 4), (0.07, 100, 7), (0.29, 100, 29), (1.0, 3, 3), (1e-6, 10, 1)],
)
def test_subset_size_is_the_ceiling_without_float_noise(fraction, rows, expected):
    assert subset_size(fraction, rows) == expected
