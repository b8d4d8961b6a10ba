"""What a run does with its data section: the loader it uses, the checks made before it
starts, and its train, val, held-out test and evaluation datasets, shaped for the model.

The datasets come from the data section's source (``datasets.py``). Every item is
``(image, label)``: a float32 ``[C, H, W]`` tensor at the model's input size (or
``input_size``), normalized with the model's mean and std, and an int label.

>>> import timm
>>> model = timm.create_model("test_resnet", num_classes=5)
>>> config = DataConfig(kind="digits", classes=[5, 6, 7, 8, 9], input_size=32)
>>> train, val, num_classes = build_datasets(config, model)
>>> image, label = train[0]
>>> tuple(image.shape), num_classes, len(train) + len(val)
((3, 32, 32), 5, 896)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from freezelab import objectstore
from freezelab.trainers import image_files
from freezelab.trainers.config import DataConfig
from freezelab.trainers.datasets import (
    SOURCES,
    LabelledSubset,
    class_folders,
    folder_images,
    local_folder_layout,
)
from freezelab.trainers.image_files import DataError
from freezelab.trainers.shifts import ShiftedImages, parse_shift
from freezelab.trainers.transforms import InputSpec, input_spec


def resolve_loader(config: DataConfig, nodes: int) -> Literal["torch", "ray_data"]:
    """The loader a run uses: ``data.loader``, or for ``auto`` Ray Data when the images
    are on object storage (a URI) or the cluster has more than one node, the DataLoader
    otherwise (and always for digits and synthetic data).

    >>> folder = DataConfig(kind="image_folder", root="s3://bucket/pets")
    >>> resolve_loader(folder, nodes=1), resolve_loader(DataConfig(kind="digits"), nodes=4)
    ('ray_data', 'torch')
    """
    if config.loader != "auto":
        return config.loader
    if config.kind != "image_folder":
        return "torch"
    if objectstore.is_uri(config.root):
        chosen = "ray_data"
    else:
        # Input shifts and epoch_fraction are applied by the DataLoader path only (a URI
        # with them is refused).
        shifted = config.shift is not None or bool(config.eval_shifts)
        torch_only = shifted or config.epoch_fraction is not None
        chosen = "ray_data" if nodes > 1 and not torch_only else "torch"
    if chosen == "torch" and config.skip_corrupt:
        raise DataError(
            "data.skip_corrupt: the DataLoader reads this local folder on one node (loader "
            "auto); skip_corrupt needs loader 'ray_data'"
        )
    return chosen


def num_classes_of(config: DataConfig) -> int:
    """The class count, without building the datasets (to build the model first).

    >>> num_classes_of(DataConfig(kind="digits", classes=[0, 1, 2]))
    3
    """
    return len(label_names_of(config))


def label_names_of(config: DataConfig) -> list[str]:
    """What each label means, in label order, without building the datasets: the
    digits kept, the class folders' names, or the synthetic classes of the data seed.
    A weights file that freezelab writes records them (``head_init.LABELS_KEY``), so
    that a later run knows whether the classifier it starts from fits its labels.

    >>> label_names_of(DataConfig(kind="digits", classes=[5, 6, 7]))
    ['5', '6', '7']
    >>> label_names_of(DataConfig(kind="synthetic", num_samples=8, num_classes=2))
    ['synthetic(seed=0):0', 'synthetic(seed=0):1']
    """
    return list(SOURCES[config.kind].label_names(config))


def check_data(config: DataConfig) -> None:
    """What can be known about the data without reading it: an image folder (and each
    of ``eval_sets``) has at least two class folders, each with image files (in
    ``train/``, ``val/`` and ``test/`` too), and a ``test/`` folder does not meet
    ``test_fraction``. A URI is listed through its object store, whose errors (no such
    bucket, access denied, an endpoint that does not answer) say so in one line."""
    if config.kind == "image_folder" and objectstore.is_uri(config.root):
        layout = image_files.folder_layout(config.root, config.test_fraction)
        for directory in filter(None, (layout.train, layout.val, layout.test)):
            image_files.check_classes(directory)
        directories = []
    else:
        directories = (
            list(filter(None, local_folder_layout(config))) if config.kind == "image_folder" else []
        )
    for name, root in config.eval_sets.items():
        directory = Path(root).expanduser()
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise DataError(f"data.eval_sets.{name}: {str(directory)!r} {problem}")
        directories.append(directory)
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for directory in directories:
        names = class_folders(directory)
        if len(names) < 2:
            raise DataError(
                f"data.root: {str(directory)!r} has one class folder ({names[0]!r}): a "
                "classifier needs at least 2"
            )
        empty = [
            name
            for name in names
            if not any(
                file.lower().endswith(IMG_EXTENSIONS)
                for _, _, files in os.walk(directory / name)
                for file in files
            )
        ]
        if empty:
            raise DataError(
                f"data.root: no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...) in the class "
                f"folder(s) {', '.join(map(repr, empty[:5]))} of {str(directory)!r}"
            )


def train_transform_is_deterministic(config: DataConfig) -> bool:
    """True when a train image is the same every epoch: only then may features be cached."""
    return not config.augment


def input_size_of(config: DataConfig, model: torch.nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of every image the datasets give ``model``.

    >>> import timm
    >>> input_size_of(DataConfig(kind="digits", input_size=64), timm.create_model("test_resnet"))
    (3, 64, 64)
    """
    spec = input_spec(config, model)
    return (spec.channels, *spec.size)


def build_datasets(config: DataConfig, model: torch.nn.Module) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` for ``config``, shaped and normalized for ``model``.

    Both datasets also have ``targets`` (the int labels) and ``classes`` (the class names).

    >>> import timm
    >>> config = DataConfig(kind="synthetic", num_samples=20, num_classes=2, input_size=16)
    >>> train, val, _ = build_datasets(config, timm.create_model("test_resnet"))
    >>> len(train), len(val), train[0][0].shape
    (16, 4, torch.Size([3, 16, 16]))
    """
    train, val, _, num_classes = build_splits(config, model)
    return train, val, num_classes


def build_splits(
    config: DataConfig, model: torch.nn.Module
) -> tuple[Dataset, Dataset, Dataset | None, int]:
    """``(train, val, test, num_classes)``: ``build_datasets`` and the held-out test
    set (None without ``data.test_fraction`` or a ``test/`` folder), which ``data.shift``
    changes as it changes train and val.

    >>> import timm
    >>> config = DataConfig(
    ...     kind="synthetic", num_samples=40, num_classes=2, input_size=16, test_fraction=0.25
    ... )
    >>> train, val, test, _ = build_splits(config, timm.create_model("test_resnet"))
    >>> len(train), len(val), len(test)
    (22, 8, 10)
    """
    spec = input_spec(config, model)
    train, val, test = SOURCES[config.kind].datasets(config, spec)
    if config.shift is not None:
        train, val = (_shifted(dataset, config.shift, config, spec) for dataset in (train, val))
        if test is not None:
            test = _shifted(test, config.shift, config, spec)
    return train, val, test, len(train.classes)


def build_eval_sets(config: DataConfig, model: torch.nn.Module, val: Dataset) -> dict[str, Dataset]:
    """The extra evaluation sets, by the name their metric takes (``shifted/val_acc/<name>``):
    a shifted copy of ``val`` for each of ``eval_shifts``, then each of ``eval_sets``
    (read as the val set is, with the same class names as the training data)."""
    spec = input_spec(config, model)
    views: dict[str, Dataset] = {
        name: _shifted(val, name, config, spec) for name in config.eval_shifts
    }
    for name, root in config.eval_sets.items():
        images = folder_images(Path(root).expanduser(), spec, is_training=False)
        if images.classes != list(val.classes):
            raise DataError(
                f"data.eval_sets.{name}: {root!r} has the class folders {images.classes}, "
                f"but the training data's classes are {list(val.classes)}"
            )
        views[name] = LabelledSubset(images, range(len(images)), images.targets)
    return views


def build_test_sets(
    config: DataConfig, model: torch.nn.Module, test: Dataset | None
) -> dict[str, Dataset]:
    """The held-out test set and a shifted copy of it for each of ``eval_shifts``, by
    the suffix of their metric: ``""`` for ``test_acc``, ``<shift>`` for
    ``shifted/test_acc/<shift>``; empty without a test set."""
    if test is None:
        return {}
    spec = input_spec(config, model)
    return {"": test, **{name: _shifted(test, name, config, spec) for name in config.eval_shifts}}


def _shifted(dataset: Dataset, shift: str, config: DataConfig, spec: InputSpec) -> Dataset:
    # Synthetic data is generated already centred: it has no pixel range to return to.
    pixels = config.kind != "synthetic"
    return ShiftedImages(
        dataset,
        parse_shift(shift),
        config.seed,
        spec.mean if pixels else None,
        spec.std if pixels else None,
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order (and workers' random seeds) depend only on ``seed``.

    Under Ray, ``ray.train.torch.prepare_data_loader`` swaps in a DistributedSampler.

    >>> loader = make_loader(list(range(6)), 3, shuffle=False, seed=0)
    >>> [batch.tolist() for batch in loader]
    [[0, 1, 2], [3, 4, 5]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
