"""Train and val datasets for a run: an image folder, scikit-learn's digits, or synthetic tensors.

Every item is ``(image, label)``: a float32 ``[C, H, W]`` tensor at the model's input size
(or ``input_size``), normalized with the model's mean and std, and an int label.

>>> import timm
>>> model = timm.create_model("test_resnet", num_classes=5)
>>> config = DataConfig(kind="digits", classes=[5, 6, 7, 8, 9], input_size=32)
>>> train, val, num_classes = build_datasets(config, model)
>>> image, label = train[0]
>>> tuple(image.shape), num_classes, len(train) + len(val)
((3, 32, 32), 5, 896)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from freezelab import objectstore
from freezelab.trainers import image_files
from freezelab.trainers.config import ALL_DIGITS, DataConfig
from freezelab.trainers.image_files import DataError
from freezelab.trainers.shifts import ShiftedImages, parse_shift

# timm's default minimum crop (8% of the area) can cut an 8x8 digit out of its own image.
_TENSOR_CROP_SCALE = (0.35, 1.0)


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
        # Input shifts are applied by the DataLoader path only (a URI with them is refused).
        shifted = config.shift is not None or bool(config.eval_shifts)
        chosen = "ray_data" if nodes > 1 and not shifted else "torch"
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
    if config.kind == "digits":
        return len(config.classes or ALL_DIGITS)
    if config.kind == "synthetic":
        return config.num_classes
    if objectstore.is_uri(config.root):
        return len(image_files.class_names(image_files.folder_layout(config.root).train))
    train_dir, _ = _folder_layout(config)
    return len(_class_names(train_dir))


def check_data(config: DataConfig) -> None:
    """What can be known about the data without reading it: an image folder (and each
    of ``eval_sets``) has at least two class folders, each with image files (in
    ``train/`` and ``val/`` too). A URI is listed through its object store, whose errors
    (no such bucket, access denied, an endpoint that does not answer) say so in one line."""
    if config.kind == "image_folder" and objectstore.is_uri(config.root):
        layout = image_files.folder_layout(config.root)
        for directory in filter(None, (layout.train, layout.val)):
            image_files.check_classes(directory)
        directories = []
    else:
        directories = (
            list(filter(None, _folder_layout(config))) if config.kind == "image_folder" else []
        )
    for name, root in config.eval_sets.items():
        directory = Path(root).expanduser()
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise DataError(f"data.eval_sets.{name}: {str(directory)!r} {problem}")
        directories.append(directory)
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for directory in directories:
        names = _class_names(directory)
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
    spec = _input_spec(config, model)
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
    spec = _input_spec(config, model)
    if config.kind == "image_folder":
        train, val = _folder_datasets(config, spec)
    elif config.kind == "digits":
        train, val = _digit_datasets(config, spec)
    else:
        train, val = _synthetic_datasets(config, spec)
    if config.shift is not None:
        train, val = (_shifted(dataset, config.shift, config, spec) for dataset in (train, val))
    return train, val, len(train.classes)


def build_eval_sets(config: DataConfig, model: torch.nn.Module, val: Dataset) -> dict[str, Dataset]:
    """The extra evaluation sets, by the name their metric takes (``val_acc/<name>``):
    a shifted copy of ``val`` for each of ``eval_shifts``, then each of ``eval_sets``
    (read as the val set is, with the same class names as the training data)."""
    spec = _input_spec(config, model)
    views: dict[str, Dataset] = {
        name: _shifted(val, name, config, spec) for name in config.eval_shifts
    }
    for name, root in config.eval_sets.items():
        images = _folder_images(Path(root).expanduser(), spec, is_training=False)
        if images.classes != list(val.classes):
            raise DataError(
                f"data.eval_sets.{name}: {root!r} has the class folders {images.classes}, "
                f"but the training data's classes are {list(val.classes)}"
            )
        views[name] = _Subset(images, range(len(images)), images.targets)
    return views


def _shifted(dataset: Dataset, shift: str, config: DataConfig, spec: _InputSpec) -> Dataset:
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


# -- what the model expects ---------------------------------------------------------


@dataclass(frozen=True)
class _InputSpec:
    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str


def _input_spec(config: DataConfig, model: torch.nn.Module) -> _InputSpec:
    import timm.data

    # A wrapper (freezelab's FineTuneModel) keeps timm's pretrained_cfg on its backbone.
    source = model if hasattr(model, "pretrained_cfg") else getattr(model, "backbone", model)
    cfg = timm.data.resolve_data_config({}, model=source)
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    # pretrained_cfg says 3 channels even for a model built with in_chans=1.
    channels = first_conv.in_channels if first_conv is not None else cfg["input_size"][0]
    side = config.input_size
    return _InputSpec(
        channels=channels,
        size=(side, side) if side else tuple(cfg["input_size"][1:]),
        mean=_per_channel(cfg["mean"], channels),
        std=_per_channel(cfg["std"], channels),
        interpolation=cfg["interpolation"],
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center"),
    )


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    if mode == "nearest":
        return F.interpolate(images, size=size, mode=mode)
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)


def _tensor_augment(size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=_TENSOR_CROP_SCALE, antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip()])


# -- splits ------------------------------------------------------------------------


def _split(
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


def _cap_per_class(
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


# -- image folder --------------------------------------------------------------------


class _Subset(Dataset):
    """Some items of a dataset, with their labels at hand (counts, stratification)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.targets = [targets[i] for i in self.indices]
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]]


def _folder_layout(config: DataConfig) -> tuple[Path, Path | None]:
    """(train directory, val directory, or None when val is split off the train one)."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data.root: {str(root)!r} {problem}")
    train, val = root / "train", root / "val"
    if train.is_dir() and val.is_dir():
        return train, val
    if train.is_dir() or val.is_dir():
        have, missing = ("train", "val") if train.is_dir() else ("val", "train")
        raise DataError(
            f"data.root: {str(root)!r} has {have}/ but no {missing}/; give both, "
            "or put the class folders directly under root"
        )
    return root, None


def _class_names(directory: Path) -> list[str]:
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


@functools.lru_cache(maxsize=8)
def folder_transform(spec: _InputSpec, is_training: bool) -> Callable:
    """timm's transform of an image file for ``spec``: the one both loaders apply (the
    DataLoader's ``ImageFolder`` and Ray Data's decode tasks), so they give the same
    tensors. ``augment`` means crop and flip, nothing else."""
    import timm.data

    return timm.data.create_transform(
        input_size=(spec.channels, *spec.size),
        is_training=is_training,
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        crop_pct=spec.crop_pct,
        crop_mode=spec.crop_mode,
        color_jitter=None,
    )


def _folder_images(directory: Path, spec: _InputSpec, is_training: bool) -> Dataset:
    """The class folders under ``directory``, with timm's transform for ``spec``."""
    from torchvision.datasets import ImageFolder, folder

    if spec.channels not in (1, 3):
        raise DataError(
            f"the model takes {spec.channels} input channels; image_folder gives 1 or 3"
        )

    class ClassFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            names = _class_names(Path(directory))
            return names, {name: i for i, name in enumerate(names)}

    transform = folder_transform(spec, is_training)
    loader = _load_gray if spec.channels == 1 else folder.default_loader
    try:
        return ClassFolder(str(directory), transform=transform, loader=loader)
    except FileNotFoundError as err:  # a class folder without any image
        raise DataError(f"data.root: {directory}: {err}") from None


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
        train_idx, val_idx = _split(
            train_targets, config.val_fraction, config.seed, classes, "data.root"
        )
    else:
        if list(val_classes) != list(classes):
            raise DataError(
                f"data.root: train/ has classes {list(classes)} but val/ has {list(val_classes)}"
            )
        train_idx, val_idx = list(range(len(train_targets))), list(range(val_count))
    train_idx = _cap_per_class(train_idx, train_targets, config.train_per_class, config.seed)
    return train_idx, val_idx


def _folder_datasets(config: DataConfig, spec: _InputSpec) -> tuple[Dataset, Dataset]:
    if objectstore.is_uri(config.root):
        raise DataError(
            f"data.root: {config.root!r} is a URI, which the DataLoader does not read; "
            "use data.loader 'ray_data' (or 'auto')"
        )
    train_dir, val_dir = _folder_layout(config)
    train_images = _folder_images(train_dir, spec, config.augment)
    val_images = _folder_images(val_dir or train_dir, spec, False)
    train_idx, val_idx = folder_split(
        config,
        train_images.targets,
        train_images.classes,
        val_images.classes if val_dir is not None else None,
        len(val_images),
    )
    return (
        _Subset(train_images, train_idx, train_images.targets),
        _Subset(val_images, val_idx, val_images.targets),
    )


# -- tensor datasets: digits and synthetic ------------------------------------------


class _TensorImages(Dataset):
    """Resized images kept as uint8 (a quarter of float32); normalized per item."""

    def __init__(
        self,
        pixels: torch.Tensor,
        targets: list[int],
        classes: list[str],
        spec: _InputSpec,
        augment: bool,
    ):
        self.pixels, self.targets, self.classes = pixels, targets, classes
        self.channels = spec.channels
        self.mean = torch.tensor(spec.mean).view(-1, 1, 1)
        self.std = torch.tensor(spec.std).view(-1, 1, 1)
        self.augment = _tensor_augment(spec.size) if augment else None

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
        _resize(chunk, size, interpolation).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        for chunk in images.split(256)
    ]
    return torch.cat(chunks)


def _digit_datasets(config: DataConfig, spec: _InputSpec) -> tuple[Dataset, Dataset]:
    _, digit_of = _digits()
    digits = config.classes or ALL_DIGITS
    label_of = {digit: label for label, digit in enumerate(digits)}
    chosen = [i for i, digit in enumerate(digit_of) if digit in label_of]
    labels = [label_of[digit_of[i]] for i in chosen]
    names = [str(digit) for digit in digits]
    train, val = _split(labels, config.val_fraction, config.seed, names, "digits")
    train = _cap_per_class(train, labels, config.train_per_class, config.seed)
    pixels = _digit_pixels(spec.size, spec.interpolation)

    def subset(positions: list[int], augment: bool) -> _TensorImages:
        rows = torch.tensor([chosen[p] for p in positions], dtype=torch.long)
        return _TensorImages(pixels[rows], [labels[p] for p in positions], names, spec, augment)

    return subset(train, config.augment), subset(val, False)


class _SyntheticImages(Dataset):
    """A class prototype plus unit Gaussian noise, generated per item from (seed, index).

    Values are already zero-centred, so no mean/std is applied; nothing is held in memory
    but the small prototypes, whatever ``num_samples`` is.
    """

    def __init__(
        self,
        config: DataConfig,
        spec: _InputSpec,
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
        self.augment = _tensor_augment(spec.size) if augment else None

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
            image = _resize(image[None], self.spec.size, self.spec.interpolation)[0]
        if self.augment is not None:
            image = self.augment(image)
        return image, label


def _synthetic_datasets(config: DataConfig, spec: _InputSpec) -> tuple[Dataset, Dataset]:
    generator = torch.Generator().manual_seed(config.seed)
    balanced = torch.arange(config.num_samples) % config.num_classes
    labels = balanced[torch.randperm(config.num_samples, generator=generator)].tolist()
    names = [str(label) for label in range(config.num_classes)]
    train, val = _split(labels, config.val_fraction, config.seed, names, "synthetic")
    train = _cap_per_class(train, labels, config.train_per_class, config.seed)
    return (
        _SyntheticImages(config, spec, train, labels, config.augment),
        _SyntheticImages(config, spec, val, labels, False),
    )
