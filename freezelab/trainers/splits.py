"""Seeded splits: the held-out test split, stratified train/val, and the few-shot cap
per class. Every dataset source splits with these, and an image folder's split (``folder_split``) is the same for
both loaders (the DataLoader's datasets and Ray Data's).

>>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, 0, ["a", "b"], "example")
([1, 2, 3, 5, 6, 7], [0, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from freezelab.trainers.config import DataConfig
from freezelab.trainers.image_files import DataError


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int, classes: Sequence[str], what: str
) -> tuple[list[int], list[int]]:
    """Stratified: each class gives round(n * val_fraction) items, at least one, to val."""
    sizes = _class_sizes(range(len(labels)), labels)
    return _take(range(len(labels)), labels, val_fraction, sizes, seed, classes, what, "val")


def split_with_test(
    labels: Sequence[int], config: DataConfig, classes: Sequence[str], what: str
) -> tuple[list[int], list[int], list[int]]:
    """``(train, val, test)`` indices of a pool of items: the test split first (each
    class gives round(n * test_fraction), at least one, drawn with ``held_out_seed``), then
    val out of the rest (round(n * val_fraction) of the class's n, as without a test
    split), then the ``train_per_class`` cap. The test split depends only on the pool,
    ``test_fraction`` and the data's seed: not on val_fraction, the cap, or the run's
    seed, so every run of a study is judged on the same items. Without
    ``test_fraction``, val and train are what ``stratified_split`` gives, and no test.

    >>> config = DataConfig(kind="digits", val_fraction=0.25, test_fraction=0.25)
    >>> split_with_test([0] * 4 + [1] * 4, config, ["a", "b"], "example")
    ([0, 2, 4, 5], [3, 7], [1, 6])
    """
    if config.test_fraction is None:
        test: list[int] = []
        train, val = stratified_split(labels, config.val_fraction, config.seed, classes, what)
    else:
        rest, test = carve_test(labels, config, classes, what)
        sizes = _class_sizes(range(len(labels)), labels)
        train, val = _take(
            rest, labels, config.val_fraction, sizes, config.seed, classes, what, "val"
        )
    train = cap_per_class(train, labels, config.train_per_class, config.seed)
    return train, val, test


def carve_test(
    labels: Sequence[int], config: DataConfig, classes: Sequence[str], what: str
) -> tuple[list[int], list[int]]:
    """``(rest, test)``: the seeded, stratified test split of ``data.test_fraction``;
    each class keeps at least two items for the train/val split."""
    assert config.test_fraction is not None
    everything = range(len(labels))
    sizes = _class_sizes(everything, labels)
    seed = held_out_seed(config.seed)
    return _take(everything, labels, config.test_fraction, sizes, seed, classes, what, "test")


def held_out_seed(seed: int) -> int:
    """The test split's own seed, derived from the data's seed: a stream apart from the
    val split's, which draws from ``seed`` itself."""
    return int(np.random.SeedSequence([seed, _TEST_STREAM]).generate_state(1)[0])


_TEST_STREAM = 0x7E57


def _take(
    indices: Sequence[int],
    labels: Sequence[int],
    fraction: float,
    sizes: dict[int, int],
    seed: int,
    classes: Sequence[str],
    what: str,
    part: str,
) -> tuple[list[int], list[int]]:
    """``(kept, taken)``: each class of ``indices`` gives round(sizes[class] * fraction)
    of its items, at least one, to ``part``, and keeps at least one (two before the val
    split, when ``part`` is the test split)."""
    generator = torch.Generator().manual_seed(seed)
    keep_at_least = 2 if part == "test" else 1
    kept: list[int] = []
    taken: list[int] = []
    for label, members in _by_class(indices, labels).items():
        if len(members) < keep_at_least + 1:
            split = "train/val" if part == "val" else "train/val/test"
            raise DataError(
                f"{what}: class {classes[label]!r} has {len(members)} image(s); the {split} "
                f"split ({part}_fraction={fraction}) needs at least {keep_at_least + 1} per class"
            )
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        n_taken = min(max(1, round(sizes[label] * fraction)), len(members) - keep_at_least)
        taken += shuffled[:n_taken]
        kept += shuffled[n_taken:]
    return sorted(kept), sorted(taken)


def _class_sizes(indices: Sequence[int], labels: Sequence[int]) -> dict[int, int]:
    return {label: len(members) for label, members in _by_class(indices, labels).items()}


def cap_per_class(
    indices: Sequence[int], labels: Sequence[int], limit: int | None, seed: int
) -> list[int]:
    if limit is None:
        return list(indices)
    generator = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    for members in _by_class(indices, labels).values():
        kept += [members[i] for i in torch.randperm(len(members), generator=generator)[:limit]]
    return sorted(kept)


def _by_class(indices: Sequence[int], labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(labels[index], []).append(index)
    return dict(sorted(groups.items()))


def folder_split(
    config: DataConfig,
    train_targets: Sequence[int],
    classes: Sequence[str],
    val_classes: Sequence[str] | None,
    val_count: int,
    test_classes: Sequence[str] | None = None,
    test_count: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """``(train, val, test)`` indices of an image folder. Train indices are into its
    train files; val and test indices into its ``val/`` and ``test/`` files when it has
    them (``val_classes``, ``test_classes`` given, each whole), else into the train
    files, split off them with ``split_with_test`` (by ``val_fraction`` and
    ``test_fraction``). With ``train/`` and ``val/`` but no ``test/``, the test split
    of ``test_fraction`` comes out of the train files. Then the seeded
    ``train_per_class`` cap. Both loaders (DataLoader, Ray Data) split with this."""
    for name, other in (("val", val_classes), ("test", test_classes)):
        if other is not None and list(other) != list(classes):
            raise DataError(
                f"data.root: train/ has classes {list(classes)} but {name}/ has {list(other)}"
            )
    test_idx = list(range(test_count))
    if val_classes is None and test_classes is None:
        return split_with_test(train_targets, config, classes, "data.root")
    if val_classes is None:
        train_idx, val_idx = stratified_split(
            train_targets, config.val_fraction, config.seed, classes, "data.root"
        )
    else:
        train_idx, val_idx = list(range(len(train_targets))), list(range(val_count))
        if test_classes is None and config.test_fraction is not None:
            train_idx, test_idx = carve_test(train_targets, config, classes, "data.root")
    train_idx = cap_per_class(train_idx, train_targets, config.train_per_class, config.seed)
    return train_idx, val_idx, test_idx
