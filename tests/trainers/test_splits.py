"""The held-out test split: carved out first, stratified and seeded by the data alone, so
every run of a study is judged on the same items; an image folder's test/ folder; and
the values that cannot work, refused before anything runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from freezelab.cli import main
from freezelab.trainers.config import DataConfig
from freezelab.trainers.data import DataError, build_datasets, build_splits, check_data
from freezelab.trainers.splits import split_with_test, stratified_split
from tests.conftest import TINY, merge


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=3)


def _digits(**fields) -> DataConfig:
    return DataConfig(kind="digits", classes=[0, 1, 2], input_size=8, **fields)


def _pixels(dataset) -> tuple[torch.Tensor, list[int]]:
    return dataset.pixels, list(dataset.targets)


def _write_class_folders(root: Path, counts: dict[str, int], start: int = 0) -> None:
    """Tiny PNGs whose flat grey level is unique: an item tells which file it came from."""
    level = start
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (level, 255 - level, level // 2)).save(
                root / name / f"{i}.png"
            )
            level += 3


def _files(subset) -> list[str]:
    return [subset.dataset.samples[i][0] for i in subset.indices]


def _folder(root: Path, **fields) -> DataConfig:
    return DataConfig(kind="image_folder", root=str(root), input_size=16, **fields)


# -- the split ---------------------------------------------------------------------


def test_the_split_is_disjoint_complete_and_stratified():
    labels = [0] * 40 + [1] * 25 + [2] * 11
    config = _digits(test_fraction=0.2, val_fraction=0.3)
    train, val, test = split_with_test(labels, config, ["a", "b", "c"], "example")
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == list(range(len(labels)))
    by_class = Counter(labels)
    # Shares of each whole class: round(n * fraction), test first, then val.
    assert Counter(labels[i] for i in test) == {c: round(n * 0.2) for c, n in by_class.items()}
    assert Counter(labels[i] for i in val) == {c: round(n * 0.3) for c, n in by_class.items()}


def test_without_test_fraction_the_split_is_todays():
    labels = [0] * 9 + [1] * 7
    train, val, test = split_with_test(labels, _digits(val_fraction=0.25), ["a", "b"], "example")
    assert (train, val) == stratified_split(labels, 0.25, 0, ["a", "b"], "example")
    assert test == []
    assert build_splits(_digits(), timm.create_model("test_resnet", num_classes=3))[2] is None


def test_the_test_set_depends_on_the_data_alone(model):
    reference = _pixels(build_splits(_digits(test_fraction=0.25), model)[2])
    variants = [
        _digits(test_fraction=0.25, val_fraction=0.4),
        _digits(test_fraction=0.25, train_per_class=5),
        _digits(test_fraction=0.25, augment=True),
    ]
    for config in variants:
        test = _pixels(build_splits(config, model)[2])
        assert torch.equal(test[0], reference[0]) and test[1] == reference[1], config
    # The run's seed reaches the global random state before the data is built (the
    # loop's _seed_everything): the split draws from generators of its own.
    torch.manual_seed(1234)
    again = _pixels(build_splits(_digits(test_fraction=0.25), model)[2])
    assert torch.equal(again[0], reference[0]) and again[1] == reference[1]
    other_seed = _pixels(build_splits(_digits(test_fraction=0.25, seed=1), model)[2])
    assert not torch.equal(other_seed[0], reference[0])


def test_train_val_and_test_images_are_disjoint(model):
    train, val, test, _ = build_splits(_digits(test_fraction=0.2, val_fraction=0.2), model)
    rows = {
        name: {bytes(image.numpy()) for image in dataset.pixels}
        for name, dataset in (("train", train), ("val", val), ("test", test))
    }
    assert not rows["test"] & rows["train"] and not rows["test"] & rows["val"]
    assert Counter(test.targets) == {0: 36, 1: 36, 2: 35}  # round(0.2 * 178, 182, 177)


def test_synthetic_data_has_a_seeded_test_split(model):
    config = DataConfig(
        kind="synthetic", num_samples=60, num_classes=3, input_size=8, test_fraction=0.2
    )
    _, _, test, _ = build_splits(config, model)
    capped = config.model_copy(update={"train_per_class": 4, "val_fraction": 0.5})
    train, val, same, _ = build_splits(capped, model)
    assert test.indices == same.indices and len(test) == 12
    assert not set(test.indices) & (set(train.indices) | set(val.indices))


# -- image folders -----------------------------------------------------------------


def test_a_folder_without_test_folder_gives_a_test_split_first(tmp_path, model):
    _write_class_folders(tmp_path, {"cat": 10, "dog": 10})
    train, val, test, _ = build_splits(_folder(tmp_path, test_fraction=0.2), model)
    assert len(test) == 4 and Counter(test.targets) == {0: 2, 1: 2}
    assert not set(_files(test)) & (set(_files(train)) | set(_files(val)))
    _, _, capped, _ = build_splits(
        _folder(tmp_path, test_fraction=0.2, train_per_class=2, val_fraction=0.5), model
    )
    assert _files(capped) == _files(test)
    # Evaluated as val is: the eval transform, whatever data.augment says.
    _, _, augmented, _ = build_splits(_folder(tmp_path, test_fraction=0.2, augment=True), model)
    assert torch.equal(augmented[0][0], test[0][0])


def test_a_test_folder_is_the_test_set(tmp_path, model):
    for part, start in (("train", 0), ("val", 100), ("test", 200)):
        _write_class_folders(tmp_path / part, {"cat": 4, "dog": 3}, start)
    train, val, test, _ = build_splits(_folder(tmp_path), model)
    assert [Path(f).parent.parent.name for f in _files(test)] == ["test"] * 7
    assert (len(train), len(val), len(test)) == (7, 7, 7)
    assert test.targets == [0, 0, 0, 0, 1, 1, 1]
    # train/ and test/: val is split off train/ by val_fraction.
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    train, val, test, _ = build_splits(_folder(tmp_path, val_fraction=0.3), model)
    assert {Path(f).parent.parent.name for f in _files(val)} == {"train"}
    assert (len(train) + len(val), len(test)) == (7, 7)


def test_train_and_val_folders_give_the_test_split_out_of_train(tmp_path, model):
    _write_class_folders(tmp_path / "train", {"cat": 10, "dog": 10})
    _write_class_folders(tmp_path / "val", {"cat": 3, "dog": 3}, 100)
    train, val, test, _ = build_splits(_folder(tmp_path, test_fraction=0.2), model)
    assert len(val) == 6 and len(test) == 4 and len(train) == 16
    assert {Path(f).parent.parent.name for f in _files(test)} == {"train"}
    assert not set(_files(test)) & set(_files(train))


@pytest.mark.parametrize(
    ("parts", "fields", "needle"),
    [
        (
            {"train": ["cat", "dog"], "test": ["cat", "owl"]},
            {},
            r"train/ has classes \['cat', 'dog'\] but test/ has \['cat', 'owl'\]",
        ),
        (
            {"train": ["cat", "dog"], "val": ["cat", "dog"], "test": ["cat", "dog"]},
            {"test_fraction": 0.2},
            r"has a test/ folder, which is the test set; remove data.test_fraction \(0.2\)",
        ),
        ({"test": ["cat", "dog"], "cat": [], "dog": []}, {}, "has test/ but no train/"),
    ],
)
def test_folder_layouts_that_cannot_work_are_named(tmp_path, model, parts, fields, needle):
    for part, classes in parts.items():
        if classes:
            _write_class_folders(tmp_path / part, dict.fromkeys(classes, 3))
        else:
            _write_class_folders(tmp_path, {part: 3})
    with pytest.raises(DataError, match=needle):
        check_data(_folder(tmp_path, **fields))
        build_datasets(_folder(tmp_path, **fields), model)


def test_a_class_too_small_for_three_splits_is_named(tmp_path, model):
    _write_class_folders(tmp_path, {"cat": 10, "lonely": 2})
    with pytest.raises(DataError, match=r"class 'lonely' has 2 image\(s\).*at least 3"):
        build_splits(_folder(tmp_path, test_fraction=0.2), model)


# -- values that cannot work, before anything runs -----------------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": 0.5, "val_fraction": 0.5}, "sum must be below 1"),
        (
            {"kind": "synthetic", "num_samples": 8, "num_classes": 3, "test_fraction": 0.2},
            "train/val/test split needs at least 3",
        ),
    ],
)
def test_bad_test_fractions_are_refused(fields, needle):
    with pytest.raises(ValidationError, match=needle):
        DataConfig(**{"kind": "digits", **fields})


def _train_error(tmp_path, capsys, data) -> str:
    path = tmp_path / "train.yaml"
    config = merge(TINY, {"storage_path": str(tmp_path / "runs"), "data": data})
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab train: error: "), errors
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    return errors[0]


def test_the_command_refuses_them_in_one_line_before_a_run_starts(tmp_path, capsys):
    assert "sum must be below 1" in _train_error(
        tmp_path, capsys, {"test_fraction": 0.5, "val_fraction": 0.5}
    )
    images = tmp_path / "images"
    for part in ("train", "val", "test"):
        _write_class_folders(images / part, {"cat": 3, "dog": 3})
    folder = {"kind": "image_folder", "root": str(images), "test_fraction": 0.2}
    assert "remove data.test_fraction" in _train_error(
        tmp_path, capsys, {**folder, "classes": None, "train_per_class": None}
    )
