"""The dataset sources, one per kind of data section: an image folder, scikit-learn's
digits, or synthetic tensors. Each gives ``(train, val, test)`` datasets whose items
are ``(image, label)`` and which have ``targets`` and ``classes``; test is None without
a held-out test split (``data.test_fraction``, or an image folder's ``test/``).

A new kind is its fields in ``DataConfig`` (``config.py``) and its source here: a
function for its class names and one for its datasets, entered in ``SOURCES``.

>>> import timm
>>> from freezelab.trainers.transforms import input_spec
>>> config = DataConfig(kind="digits", classes=[3, 4], input_size=16)
>>> source = SOURCES[config.kind]
>>> train, val, test = source.datasets(config, input_spec(config, timm.create_model("test_resnet")))
>>> source.label_names(config), train.classes, len(train) + len(val), test
(['3', '4'], ['3', '4'], 364, None)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from freezelab import objectstore
from freezelab.trainers import image_files
from freezelab.trainers.config import ALL_DIGITS, DataConfig
from freezelab.trainers.image_files import DataError
from freezelab.trainers.splits import folder_split, split_with_test
from freezelab.trainers.transforms import InputSpec, folder_transform, resize, tensor_augment

# ``(train, val, test)``; test is None without a test split (no data.test_fraction, no
# test/ folder).
Splits = tuple[Dataset, Dataset, Dataset | None]

# -- image folder --------------------------------------------------------------------


class LabelledSubset(Dataset):
    """Some items of a dataset, with their labels at hand (counts, stratification)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.targets = [targets[i] for i in self.indices]
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]]


def local_folder_layout(config: DataConfig) -> tuple[Path, Path | None, Path | None]:
    """(train directory, val directory or None when val is split off the train one,
    test directory or None): ``image_files.layout_of`` for a local folder."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data.root: {str(root)!r} {problem}")
    present = {name for name in ("train", "val", "test") if (root / name).is_dir()}
    layout = image_files.layout_of(str(root), present, config.test_fraction)
    return (
        Path(layout.train),
        Path(layout.val) if layout.val else None,
        Path(layout.test) if layout.test else None,
    )


def class_folders(directory: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints and the like) are not classes.
    names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
    if not names:
        raise DataError(
            f"data.root: no class subfolders in {str(directory)!r} "
            "(expected one folder of images per class)"
        )
    return names


def _load_gray(path: str):
    from PIL import Image

    with open(path, "rb") as file:
        return Image.open(file).convert("L")


def folder_images(directory: Path, spec: InputSpec, is_training: bool) -> Dataset:
    """The class folders under ``directory``, with timm's transform for ``spec``."""
    from torchvision.datasets import ImageFolder, folder

    if spec.channels not in (1, 3):
        raise DataError(
            f"the model takes {spec.channels} input channels; image_folder gives 1 or 3"
        )

    class ClassFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            names = class_folders(Path(directory))
            return names, {name: i for i, name in enumerate(names)}

    transform = folder_transform(spec, is_training)
    loader = _load_gray if spec.channels == 1 else folder.default_loader
    try:
        return ClassFolder(str(directory), transform=transform, loader=loader)
    except FileNotFoundError as err:  # a class folder without any image
        raise DataError(f"data.root: {directory}: {err}") from None


def _folder_datasets(config: DataConfig, spec: InputSpec) -> Splits:
    if objectstore.is_uri(config.root):
        raise DataError(
            f"data.root: {config.root!r} is a URI, which the DataLoader does not read; "
            "use data.loader 'ray_data' (or 'auto')"
        )
    train_dir, val_dir, test_dir = local_folder_layout(config)
    train_images = folder_images(train_dir, spec, config.augment)
    val_images = folder_images(val_dir or train_dir, spec, False)
    test_images = folder_images(test_dir or train_dir, spec, False)
    train_idx, val_idx, test_idx = folder_split(
        config,
        train_images.targets,
        train_images.classes,
        val_images.classes if val_dir is not None else None,
        len(val_images),
        test_images.classes if test_dir is not None else None,
        len(test_images),
    )
    test = None
    if test_dir is not None or config.test_fraction is not None:
        test = LabelledSubset(test_images, test_idx, test_images.targets)
    return (
        LabelledSubset(train_images, train_idx, train_images.targets),
        LabelledSubset(val_images, val_idx, val_images.targets),
        test,
    )


def _folder_label_names(config: DataConfig) -> list[str]:
    if objectstore.is_uri(config.root):
        return image_files.class_names(image_files.folder_layout(config.root).train)
    train_dir, _, _ = local_folder_layout(config)
    return class_folders(train_dir)


class _TensorImages(Dataset):
    """Resized images kept as uint8 (a quarter of float32); normalized per item."""

    def __init__(
        self,
        pixels: torch.Tensor,
        targets: list[int],
        classes: list[str],
        spec: InputSpec,
        augment: bool,
    ):
        self.pixels, self.targets, self.classes = pixels, targets, classes
        self.channels = spec.channels
        self.mean = torch.tensor(spec.mean).view(-1, 1, 1)
        self.std = torch.tensor(spec.std).view(-1, 1, 1)
        self.augment = tensor_augment(spec.size) if augment else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        gray = self.pixels[index].float().div(255.0)
        image = (gray.expand(self.channels, -1, -1) - self.mean) / self.std
        if self.augment is not None:
            image = self.augment(image)
        return image, self.targets[index]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, tuple[int, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # bundled with scikit-learn: no download
    images = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    return images, tuple(bunch.target.tolist())


@functools.lru_cache(maxsize=2)
def _digit_pixels(size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """All 1797 digits resized once, shared by a source task and a target task."""
    images, _ = _digits()
    # In chunks: 1797 float images at 224x224 would briefly take 360 MB.
    chunks = [
        resize(chunk, size, interpolation).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        for chunk in images.split(256)
    ]
    return torch.cat(chunks)


def _digit_datasets(config: DataConfig, spec: InputSpec) -> Splits:
    _, digit_of = _digits()
    digits = config.classes or ALL_DIGITS
    label_of = {digit: label for label, digit in enumerate(digits)}
    chosen = [i for i, digit in enumerate(digit_of) if digit in label_of]
    labels = [label_of[digit_of[i]] for i in chosen]
    names = [str(digit) for digit in digits]
    train, val, test = split_with_test(labels, config, names, "digits")
    pixels = _digit_pixels(spec.size, spec.interpolation)

    def subset(positions: list[int], augment: bool) -> _TensorImages:
        rows = torch.tensor([chosen[p] for p in positions], dtype=torch.long)
        return _TensorImages(pixels[rows], [labels[p] for p in positions], names, spec, augment)

    held_out = subset(test, False) if config.test_fraction is not None else None
    return subset(train, config.augment), subset(val, False), held_out


class _SyntheticImages(Dataset):
    """A class prototype plus unit Gaussian noise, generated per item from (seed, index).

    Values are already zero-centred, so no mean/std is applied; nothing is held in memory
    but the small prototypes, whatever ``num_samples`` is.
    """

    def __init__(
        self,
        config: DataConfig,
        spec: InputSpec,
        indices: list[int],
        labels: list[int],
        augment: bool,
    ):
        self.seed, self.indices, self.spec = config.seed, indices, spec
        self.targets = [labels[i] for i in indices]
        self.classes = [str(label) for label in range(config.num_classes)]
        side = config.image_size
        self.image_size = (side, side) if side else spec.size
        generator = torch.Generator().manual_seed(config.seed)
        # Low-resolution patterns: smooth, so they survive resizing and random crops.
        self.prototypes = torch.randn(config.num_classes, spec.channels, 4, 4, generator=generator)
        self.augment = tensor_augment(spec.size) if augment else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample, label = self.indices[index], self.targets[index]
        item_seed = int(np.random.SeedSequence([self.seed, sample]).generate_state(1)[0])
        noise = torch.randn(
            self.spec.channels, *self.image_size, generator=torch.Generator().manual_seed(item_seed)
        )
        pattern = F.interpolate(self.prototypes[label][None], size=self.image_size, mode="bilinear")
        image = pattern[0] + noise
        if self.image_size != self.spec.size:
            image = resize(image[None], self.spec.size, self.spec.interpolation)[0]
        if self.augment is not None:
            image = self.augment(image)
        return image, label


def _synthetic_datasets(config: DataConfig, spec: InputSpec) -> Splits:
    generator = torch.Generator().manual_seed(config.seed)
    balanced = torch.arange(config.num_samples) % config.num_classes
    labels = balanced[torch.randperm(config.num_samples, generator=generator)].tolist()
    names = [str(label) for label in range(config.num_classes)]
    train, val, test = split_with_test(labels, config, names, "synthetic")
    held_out = None
    if config.test_fraction is not None:
        held_out = _SyntheticImages(config, spec, test, labels, False)
    return (
        _SyntheticImages(config, spec, train, labels, config.augment),
        _SyntheticImages(config, spec, val, labels, False),
        held_out,
    )


# -- the sources, by kind --------------------------------------------------------------


def _digit_label_names(config: DataConfig) -> list[str]:
    return [str(digit) for digit in config.classes or ALL_DIGITS]


def _synthetic_label_names(config: DataConfig) -> list[str]:
    # A class is a prototype drawn from the data seed: class 0 of another seed is
    # another pattern, so the seed is part of its name.
    return [f"synthetic(seed={config.seed}):{label}" for label in range(config.num_classes)]


@dataclass(frozen=True)
class Source:
    """One kind of data section: what its labels mean, in label order, without reading
    the images (the model is built first; a weights file records them), and its
    ``(train, val, test)`` datasets for an input spec."""

    label_names: Callable[[DataConfig], list[str]]
    datasets: Callable[[DataConfig, InputSpec], Splits]


SOURCES: dict[str, Source] = {
    "image_folder": Source(_folder_label_names, _folder_datasets),
    "digits": Source(_digit_label_names, _digit_datasets),
    "synthetic": Source(_synthetic_label_names, _synthetic_datasets),
}
