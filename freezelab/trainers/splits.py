"""Seeded splits: stratified train/val, and the few-shot cap per class. Every dataset
source splits with these, and an image folder's split (``folder_split``) is the same for
both loaders (the DataLoader's datasets and Ray Data's).

>>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, 0, ["a", "b"], "example")
([1, 2, 3, 5, 6, 7], [0, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from freezelab.trainers.config import DataConfig
from freezelab.trainers.image_files import DataError


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int, classes: Sequence[str], what: str
) -> tuple[list[int], list[int]]:
    """Stratified: each class gives round(n * val_fraction) items, at least one, to val."""
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label, members in _by_class(range(len(labels)), labels).items():
        if len(members) < 2:
            raise DataError(
                f"{what}: class {classes[label]!r} has {len(members)} image(s); the train/val "
                f"split (val_fraction={val_fraction}) needs at least 2 per class"
            )
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += shuffled[:n_val]
        train += shuffled[n_val:]
    return sorted(train), sorted(val)


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
) -> tuple[list[int], list[int]]:
    """``(train indices, val indices)`` of an image folder: into its train files and
    its val files when it has ``train/`` and ``val/`` (``val_classes`` given), else
    both into its files by the seeded ``val_fraction`` split; then the seeded
    ``train_per_class`` cap. Both loaders (DataLoader, Ray Data) split with this."""
    if val_classes is None:
        train_idx, val_idx = stratified_split(
            train_targets, config.val_fraction, config.seed, classes, "data.root"
        )
    else:
        if list(val_classes) != list(classes):
            raise DataError(
                f"data.root: train/ has classes {list(classes)} but val/ has {list(val_classes)}"
            )
        train_idx, val_idx = list(range(len(train_targets))), list(range(val_count))
    train_idx = cap_per_class(train_idx, train_targets, config.train_per_class, config.seed)
    return train_idx, val_idx
