"""Datasets built from real files (PNGs in tmp_path), scikit-learn's digits and seeded noise."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_digits

from freezelab.trainers.config import DataConfig
from freezelab.trainers.data import (
    DataError,
    build_datasets,
    input_size_of,
    label_names_of,
    make_loader,
    num_classes_of,
    train_transform_is_deterministic,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=2)


def _write_class_folders(root: Path, counts: dict[str, int], start: int = 0) -> None:
    """Tiny PNGs whose flat grey level is unique, so an item tells which file it came from."""
    level = start
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            colour = (level, 255 - level, level // 2)
            Image.new("RGB", (12, 12), colour).save(root / name / f"{i}.png")
            level += 3


def _fingerprints(dataset) -> list[tuple[float, int]]:
    return [(round(float(image.mean()), 4), label) for image, label in dataset]


def _folder(root: Path, **fields) -> DataConfig:
    return DataConfig(kind="image_folder", root=str(root), input_size=16, **fields)


# -- image folder --------------------------------------------------------------------


def test_image_folder_classes_counts_and_items(tmp_path, model):
    _write_class_folders(tmp_path, {"cat": 10, "dog": 10, "owl": 5})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    config = _folder(tmp_path)

    train, val, num_classes = build_datasets(config, model)

    assert num_classes == num_classes_of(config) == 3
    assert train.classes == val.classes == ["cat", "dog", "owl"]
    assert label_names_of(config) == ["cat", "dog", "owl"]
    assert Counter(train.targets) == {0: 8, 1: 8, 2: 4}
    assert Counter(val.targets) == {0: 2, 1: 2, 2: 1}
    assert not set(_fingerprints(train)) & set(_fingerprints(val))
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert isinstance(label, int)


def test_image_folder_split_is_seeded(tmp_path, model):
    _write_class_folders(tmp_path, {"a": 10, "b": 10})

    def val_items(seed: int) -> list[tuple[float, int]]:
        return _fingerprints(build_datasets(_folder(tmp_path, seed=seed), model)[1])

    assert val_items(0) == val_items(0)
    assert val_items(0) != val_items(1)


def test_image_folder_uses_train_and_val_subfolders(tmp_path, model):
    _write_class_folders(tmp_path / "train", {"a": 4, "b": 3})
    _write_class_folders(tmp_path / "val", {"a": 2, "b": 1}, start=100)
    config = _folder(tmp_path, val_fraction=0.5)  # ignored: the folders decide

    train, val, num_classes = build_datasets(config, model)

    assert num_classes == num_classes_of(config) == 2
    assert Counter(train.targets) == {0: 4, 1: 3}
    assert Counter(val.targets) == {0: 2, 1: 1}


def test_image_folder_train_per_class_caps_train_only(tmp_path, model):
    _write_class_folders(tmp_path, {"a": 10, "b": 10})

    train, val, _ = build_datasets(_folder(tmp_path, train_per_class=3), model)
    _, full_val, _ = build_datasets(_folder(tmp_path), model)

    assert Counter(train.targets) == {0: 3, 1: 3}
    assert _fingerprints(val) == _fingerprints(full_val)


def test_image_folder_augment_randomizes_train_only(tmp_path, model):
    _write_class_folders(tmp_path, {"a": 4, "b": 4})
    # Gradient images, so that a crop or a flip changes the pixels.
    for path in tmp_path.rglob("*.png"):
        Image.fromarray(np.tile(np.arange(0, 240, 20, dtype=np.uint8), (12, 1))).save(path)
    config = _folder(tmp_path, augment=True)

    train, val, _ = build_datasets(config, model)

    random.seed(0)  # timm's crop draws from Python's random, the flip from torch's
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(5))
    assert torch.equal(val[0][0], val[0][0])
    assert not train_transform_is_deterministic(config)
    assert train_transform_is_deterministic(_folder(tmp_path))


def test_image_folder_grayscale_model_gets_one_channel(tmp_path):
    _write_class_folders(tmp_path, {"a": 2, "b": 2})
    gray_model = timm.create_model("test_resnet", num_classes=2, in_chans=1)

    train, _, _ = build_datasets(_folder(tmp_path), gray_model)

    assert train[0][0].shape == (1, 16, 16)


# -- digits --------------------------------------------------------------------------


def test_digits_keep_classes_and_remap_labels_in_order(model):
    # At 8x8 with a bilinear model nothing is resampled: items match sklearn's pixels.
    config = DataConfig(kind="digits", classes=[9, 3], input_size=8)
    digits = load_digits()

    train, val, num_classes = build_datasets(config, model)

    assert num_classes == num_classes_of(config) == 2
    assert train.classes == ["9", "3"]
    assert label_names_of(config) == ["9", "3"]
    assert label_names_of(DataConfig(kind="digits")) == [str(d) for d in range(10)]
    counts = Counter(train.targets) + Counter(val.targets)
    assert counts == {0: int((digits.target == 9).sum()), 1: int((digits.target == 3).sum())}
    originals = torch.from_numpy(digits.images).float().div(16.0).flatten(1)
    for image, label in [train[0], train[len(train) - 1], val[0]]:
        pixels = (image[0] * 0.5 + 0.5).flatten()  # test_resnet's mean and std are 0.5
        nearest = int((originals - pixels).abs().sum(dim=1).argmin())
        assert (originals[nearest] - pixels).abs().max() < 1 / 255
        assert digits.target[nearest] == [9, 3][label]


def test_digits_default_to_all_ten_and_the_models_input_size(model):
    config = DataConfig(kind="digits")

    train, val, num_classes = build_datasets(config, model)

    assert num_classes == 10 and len(train) + len(val) == 1797
    assert 0.18 < len(val) / 1797 < 0.22
    assert train[0][0].shape == (3, 160, 160)  # test_resnet's own size


def test_digits_are_normalized(model):
    train, _, _ = build_datasets(DataConfig(kind="digits", classes=[0, 1], input_size=32), model)

    images = torch.stack([train[i][0] for i in range(20)])
    assert images.shape == (20, 3, 32, 32)
    # (pixel - 0.5) / 0.5: the black background is -1, full ink +1, channels equal.
    assert images.min() == pytest.approx(-1.0)
    assert images.max() <= 1.0 + 1e-6 and images.max() > 0.9
    assert torch.equal(images[:, 0], images[:, 2])


def test_digits_train_per_class_is_a_seeded_cap(model):
    def build(seed: int):
        config = DataConfig(
            kind="digits", classes=[5, 6, 7], train_per_class=4, seed=seed, input_size=8
        )
        return build_datasets(config, model)

    def images(dataset) -> torch.Tensor:
        return torch.stack([image for image, _ in dataset])

    train, val, _ = build(0)
    assert Counter(train.targets) == {0: 4, 1: 4, 2: 4}
    assert len(val) > 100  # the cap is on train only
    assert torch.equal(images(train), images(build(0)[0]))
    assert not torch.equal(images(train), images(build(1)[0]))


def test_digits_source_and_target_tasks_do_not_share_images(model):
    source = build_datasets(DataConfig(kind="digits", classes=[0, 1, 2, 3, 4], input_size=8), model)
    target = build_datasets(DataConfig(kind="digits", classes=[5, 6, 7, 8, 9], input_size=8), model)

    seen = {tuple(image.flatten().tolist()) for image, _ in source[0]}
    assert not any(tuple(image.flatten().tolist()) in seen for image, _ in target[0])


def test_digits_augment_randomizes_train_only(model):
    config = DataConfig(kind="digits", classes=[0, 1], input_size=16, augment=True)

    train, val, _ = build_datasets(config, model)

    torch.manual_seed(0)
    views = [train[0][0] for _ in range(4)]
    assert all(view.shape == (3, 16, 16) for view in views)
    assert any(not torch.equal(views[0], view) for view in views[1:])
    assert torch.equal(val[0][0], val[0][0])


# -- synthetic -----------------------------------------------------------------------


def _synthetic(**fields) -> DataConfig:
    return DataConfig(kind="synthetic", **{"num_samples": 60, "num_classes": 3, **fields})


def test_synthetic_shapes_split_and_balance(model):
    train, val, num_classes = build_datasets(_synthetic(input_size=24), model)

    assert num_classes == num_classes_of(_synthetic()) == 3
    # Another data seed draws other class patterns: other labels.
    assert label_names_of(_synthetic()) == [f"synthetic(seed=0):{i}" for i in range(3)]
    assert label_names_of(_synthetic(seed=1)) != label_names_of(_synthetic())
    assert Counter(train.targets) == {0: 16, 1: 16, 2: 16}
    assert Counter(val.targets) == {0: 4, 1: 4, 2: 4}
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 24, 24)
    assert isinstance(label, int)


def test_synthetic_is_seeded(model):
    def first_items(seed: int) -> torch.Tensor:
        train, _, _ = build_datasets(_synthetic(seed=seed, input_size=16), model)
        return torch.stack([train[i][0] for i in range(5)])

    assert torch.equal(first_items(0), first_items(0))
    assert not torch.equal(first_items(0), first_items(1))


def test_synthetic_image_size_is_resized_to_the_input_size(model):
    train, _, _ = build_datasets(_synthetic(image_size=12, input_size=20), model)

    assert train[0][0].shape == (3, 20, 20)


def test_synthetic_labels_are_learnable(model):
    train, val, _ = build_datasets(_synthetic(num_samples=120, input_size=16), model)

    def stack(dataset):
        return torch.stack([x for x, _ in dataset]).flatten(1), torch.tensor(dataset.targets)

    (x_train, y_train), (x_val, y_val) = stack(train), stack(val)
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(3)])
    predicted = torch.cdist(x_val, centroids).argmin(dim=1)
    assert (predicted == y_val).float().mean() > 0.9  # chance is 1/3


# -- loader --------------------------------------------------------------------------


def test_make_loader_order_depends_only_on_the_seed():
    dataset = list(range(50))

    def order(seed: int, shuffle: bool = True) -> list[int]:
        loader = make_loader(dataset, 8, shuffle=shuffle, seed=seed)
        return [i for batch in loader for i in batch.tolist()]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == dataset
    assert order(3, shuffle=False) == dataset
    drop = make_loader(dataset, 8, shuffle=True, seed=0, drop_last=True)
    assert [len(batch) for batch in drop] == [8] * 6


def test_make_loader_batches_dataset_items(model):
    train, _, _ = build_datasets(_synthetic(input_size=16), model)

    images, labels = next(iter(make_loader(train, 4, shuffle=True, seed=0)))

    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64


def test_make_loader_workers_augment_reproducibly(model):
    train, _, _ = build_datasets(_synthetic(input_size=16, augment=True), model)

    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(make_loader(train, 8, shuffle=False, seed=seed, num_workers=2)))[0]

    assert torch.equal(first_batch(5), first_batch(5))
    assert not torch.equal(first_batch(5), first_batch(6))


# -- config and errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        _synthetic(),
        DataConfig(kind="digits", classes=[5, 6], train_per_class=3, augment=True),
        DataConfig(kind="image_folder", root="/data/pets", val_fraction=0.1, num_workers=2),
    ],
)
def test_config_round_trips_through_json(config):
    assert DataConfig.model_validate(config.model_dump(mode="json")) == config


def test_config_is_frozen():
    config = _synthetic()
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kind": "digits", "val_fraction": 0.0}, "val_fraction"),
        ({"kind": "digits", "val_fraction": 1.0}, "val_fraction"),
        ({"kind": "digits", "val_fraction": -0.2}, "val_fraction"),
        ({"kind": "digits", "classes": [0, 10]}, r"classes\n.*0\.\.9, got \[10\]"),
        ({"kind": "digits", "classes": [-1, 2]}, r"classes\n.*0\.\.9, got \[-1\]"),
        ({"kind": "digits", "classes": [1, 2, 1]}, r"classes\n.*\[1\] repeated"),
        ({"kind": "digits", "classes": [4]}, r"classes\n.*at least 2"),
        ({"kind": "digits", "train_per_class": 0}, "train_per_class"),
        ({"kind": "digits", "num_workers": -1}, "num_workers"),
        ({"kind": "digits", "colour": True}, "colour"),
        ({"kind": "mnist"}, "kind"),
        ({"kind": "image_folder"}, "root is required"),
        ({"kind": "synthetic", "num_classes": 3}, "num_samples is required"),
        ({"kind": "synthetic", "num_samples": 30}, "num_classes is required"),
        ({"kind": "synthetic", "num_samples": 5, "num_classes": 3}, "num_samples=5"),
        ({"kind": "image_folder", "root": "x", "classes": [0, 1]}, "classes applies to kind"),
        ({"kind": "digits", "root": "x"}, "root applies to kind 'image_folder'"),
    ],
)
def test_bad_config_names_the_field(fields, named):
    with pytest.raises(ValidationError, match=named):
        DataConfig(**fields)


def test_missing_root_is_named(tmp_path, model):
    config = _folder(tmp_path / "nowhere")
    for call in (lambda: num_classes_of(config), lambda: build_datasets(config, model)):
        with pytest.raises(DataError, match=r"data\.root: '.*nowhere' does not exist"):
            call()


def test_root_that_is_a_file_is_named(tmp_path, model):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="data.root: .* is not a directory"):
        build_datasets(_folder(tmp_path / "file.png"), model)


def test_folder_without_class_subfolders_is_named(tmp_path, model):
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="data.root: no class subfolders"):
        num_classes_of(_folder(tmp_path))


def test_class_folder_without_images_is_named(tmp_path, model):
    _write_class_folders(tmp_path, {"a": 3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.root: .*empty"):
        build_datasets(_folder(tmp_path), model)


def test_class_too_small_for_the_split_is_named(tmp_path, model):
    _write_class_folders(tmp_path, {"a": 5, "lonely": 1})
    with pytest.raises(DataError, match="class 'lonely' has 1 image.*val_fraction"):
        build_datasets(_folder(tmp_path), model)


def test_train_without_val_subfolder_is_named(tmp_path, model):
    _write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="has train/ but no val/"):
        num_classes_of(_folder(tmp_path))


def test_train_and_val_with_different_classes_are_named(tmp_path, model):
    _write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _write_class_folders(tmp_path / "val", {"a": 1, "c": 1})
    expected = r"train/ has classes \['a', 'b'\] but val/ has \['a', 'c'\]"
    with pytest.raises(DataError, match=expected):
        build_datasets(_folder(tmp_path), model)


@pytest.mark.parametrize(
    "config",
    [
        _synthetic(image_size=12),
        DataConfig(kind="digits", input_size=20),
        DataConfig(kind="digits"),
    ],
)
def test_input_size_of_is_the_item_shape(config, model):
    train, val, _ = build_datasets(config, model)

    assert input_size_of(config, model) == tuple(train[0][0].shape) == tuple(val[0][0].shape)


def test_input_size_of_follows_the_models_channels():
    gray_model = timm.create_model("test_resnet", num_classes=2, in_chans=1)
    config = DataConfig(kind="digits", classes=[0, 1], input_size=16)

    train, _, _ = build_datasets(config, gray_model)

    assert input_size_of(config, gray_model) == (1, 16, 16) == tuple(train[0][0].shape)
    batch = torch.stack([train[0][0], train[1][0]])
    assert gray_model(batch).shape == (2, 2)


def test_wrapped_model_takes_the_size_of_its_backbone():
    class Wrapper(torch.nn.Module):  # like FineTuneModel: no pretrained_cfg of its own
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("test_resnet", num_classes=0)

    train, _, _ = build_datasets(_synthetic(), Wrapper())

    assert train[0][0].shape == (3, 160, 160)


def test_every_kind_of_data_section_has_a_source():
    from typing import get_args

    from freezelab.trainers.datasets import SOURCES

    assert set(SOURCES) == set(get_args(DataConfig.model_fields["kind"].annotation))
