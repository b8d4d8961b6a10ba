"""Image folders through Ray Data: the same classes, split and tensors as the DataLoader
path, seeded order per (seed, epoch, rank), the whole val set once, a 2-worker run from
a real S3 endpoint (moto), corrupt images named or skipped, and the auto rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from freezelab.trainers import ray_data
from freezelab.trainers.config import DataConfig, validate_config
from freezelab.trainers.data import DataError, build_datasets, build_splits, resolve_loader
from freezelab.trainers.image_files import image_files
from freezelab.trainers.launch import run_training
from freezelab.trainers.transforms import input_spec
from tests.conftest import TINY, merge


def _jpeg_folder(root: Path, classes=("ant", "bee", "cat"), per_class=8, size=(40, 30)) -> Path:
    """Class folders of small JPEGs, each a seeded pattern (so that a class can be learnt
    a little); one nested subfolder, to check the file order of nested folders."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        for i in range(per_class):
            folder = root / name / ("extra" if i == per_class - 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 60, (size[1], size[0], 3)) + 80 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=90)
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def _data(root, **fields) -> DataConfig:
    return DataConfig(kind="image_folder", root=str(root), input_size=32, **fields)


def _run_config(tmp_path: Path, root, **update):
    data = {"kind": "image_folder", "root": str(root), "input_size": 32, "val_fraction": 0.25}
    base = merge(TINY, {"storage_path": str(tmp_path / "runs"), "data": data})
    base["data"].pop("classes"), base["data"].pop("train_per_class")
    return validate_config(merge(base, update))


# -- what is read: the same as the DataLoader path ------------------------------------


def test_listing_split_and_tensors_match_the_dataloader_path(folder):
    model = timm.create_model("test_resnet", num_classes=3)
    config = _data(folder, train_per_class=5)
    train, val, _ = build_datasets(config, model)
    table = ray_data.image_table(config)

    assert table.classes == train.classes == ["ant", "bee", "cat"]
    # torchvision's own order of files, nested folders included.
    classes, samples = image_files(str(folder))
    assert [Path(p) for p, _ in samples] == [Path(p) for p, _ in train.dataset.samples]
    assert [label for _, label in table.train] == train.targets
    assert [label for _, label in table.val] == val.targets
    paths = [Path(p) for p, _ in train.dataset.samples]
    assert [Path(p) for p, _ in table.train] == [paths[i] for i in train.indices]
    # The Ray Data transform gives the DataLoader's tensors, bit for bit.
    spec = input_spec(config, model)
    decode = ray_data.DecodeImages(str(folder), spec, train=False, skip_corrupt=False)
    rows = decode(
        {
            "file": np.array([p for p, _ in table.val[:3]]),
            "label": np.array([0, 0, 0]),
            "index": np.arange(3),
        }
    )
    for j in range(3):
        assert torch.equal(torch.from_numpy(rows["image"][j]), val[j][0])


def test_the_test_split_and_a_test_folder_are_the_dataloader_paths(folder, tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    config = _data(folder, test_fraction=0.25, train_per_class=3)
    _, _, test, _ = build_splits(config, model)
    table = ray_data.image_table(config)
    paths = [Path(p) for p, _ in test.dataset.samples]
    assert [Path(p) for p, _ in table.test] == [paths[i] for i in test.indices]
    assert [label for _, label in table.test] == test.targets == [0, 0, 1, 1, 2, 2]
    assert ray_data.image_table(_data(folder)).test is None
    for part in ("train", "test"):
        _jpeg_folder(tmp_path / part)
    _, _, test, _ = build_splits(_data(tmp_path), model)
    table = ray_data.image_table(_data(tmp_path))
    assert [Path(p) for p, _ in table.test] == [Path(p) for p, _ in test.dataset.samples]
    assert {Path(p).relative_to(tmp_path).parts[0] for p, _ in table.test} == {"test"}


def test_rows_per_rank_cover_the_set_once_and_pad_like_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for size, world in [(10, 3), (9, 3), (7, 2), (5, 1)]:
        shards = [ray_data.train_rows(size, 0, world, r) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of steps everywhere
        assert set(sum(shards, [])) == set(range(size))
        padded = len(DistributedSampler(range(size), num_replicas=world, rank=0))
        assert len(shards[0]) == padded
        val = [ray_data.val_rows(size, world, r) for r in range(world)]
        assert sorted(sum(val, [])) == list(range(size))  # whole set, no padding
    assert ray_data.train_rows(10, 0, 2, 0) != ray_data.train_rows(10, 1, 2, 0)


def test_the_auto_rule():
    local, uri = _data("/data/pets"), _data("s3://bucket/pets")
    assert resolve_loader(local, nodes=1) == "torch"
    assert resolve_loader(local, nodes=2) == "ray_data"
    assert resolve_loader(uri, nodes=1) == "ray_data"
    assert resolve_loader(_data("/data/pets", loader="torch"), nodes=4) == "torch"
    assert resolve_loader(_data("/data/pets", loader="ray_data"), nodes=1) == "ray_data"
    assert resolve_loader(DataConfig(kind="digits"), nodes=4) == "torch"
    # Input shifts are the DataLoader's: auto keeps it on several nodes.
    assert resolve_loader(_data("/data/pets", eval_shifts=["blur:1"]), nodes=2) == "torch"
    with pytest.raises(DataError, match="skip_corrupt needs loader 'ray_data'"):
        resolve_loader(_data("/data/pets", skip_corrupt=True), nodes=1)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"kind": "digits", "loader": "ray_data"}, "loader 'ray_data' reads image folders"),
        ({"kind": "digits", "skip_corrupt": True}, "skip_corrupt applies to kind 'image_folder'"),
        (
            {"kind": "image_folder", "root": "s3://b/p", "loader": "torch"},
            "loader 'torch' reads local or mounted folders",
        ),
        (
            {"kind": "image_folder", "root": "/d", "loader": "torch", "skip_corrupt": True},
            "skip_corrupt needs loader 'ray_data'",
        ),
        (
            {"kind": "image_folder", "root": "s3://b/p", "eval_shifts": ["blur:1"]},
            "eval_shifts: not available with loader 'ray_data'",
        ),
    ],
)
def test_loader_fields_are_validated(fields, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**fields)


# -- runs ------------------------------------------------------------------------------


@pytest.mark.ray
def test_each_epochs_order_is_a_function_of_seed_epoch_and_rank(ray_session, folder, tmp_path):
    info = ray_data.shard_info(_run_config(tmp_path, folder, data={"loader": "ray_data"}), 2)

    def order(epoch: int, rank: int = 0, seed: int = 0) -> list[int]:
        train, _, _ = ray_data.rank_batches(info, rank, 2, 4, 4, seed)
        train.set_epoch(epoch)
        return [int(i) for _, _, indices in train for i in indices]

    assert order(1) == order(1)  # read again: the same batches
    assert order(1) != order(2) and sorted(order(1)) == sorted(order(2))
    assert not set(order(1)) & set(order(1, rank=1))  # 18 rows: 9 per rank, none shared


@pytest.mark.ray
def test_one_process_run_resumes_bit_exactly_and_caches_features(ray_session, folder, tmp_path):
    # In one process Ray Data's datasets are iterated directly (no Train worker group).
    common = {"data": {"loader": "ray_data", "test_fraction": 0.25}, "epochs": 3}
    whole = run_training(_run_config(tmp_path, folder, name="whole", **common))
    # The held-out test set, read by Ray Data: the saved model's accuracy on the
    # DataLoader path's test set.
    from freezelab.trainers import checkpoint as ckpt
    from freezelab.trainers.models import build_for_config

    model = build_for_config(whole_config := _run_config(tmp_path, folder, name="whole", **common))
    ckpt.load_model_weights(whole.checkpoint_dir, model)
    _, _, test_set, _ = build_splits(whole_config.data, model.eval())
    with torch.no_grad():
        images = torch.stack([image for image, _ in test_set])
        predicted = model(images).argmax(1).tolist()
    assert whole.metrics["test_images"] == len(test_set) == 6
    assert whole.metrics["test_acc"] == pytest.approx(
        sum(p == t for p, t in zip(predicted, test_set.targets, strict=True)) / 6
    )

    class StopAfterFirstEpoch(Exception):
        pass

    from freezelab.trainers.reporting import LocalReporter

    config = _run_config(tmp_path, folder, name="cut", **common)

    class Cut(LocalReporter):
        def report(self, metrics, write):
            super().report(metrics, write)
            if metrics["epoch"] == 0:
                raise StopAfterFirstEpoch

    from freezelab.trainers.location import RunLocation

    where = RunLocation.of(config)
    with pytest.raises(StopAfterFirstEpoch):
        run_training(config, reporter=Cut(where.local_checkpoint_dir, 3, []), progress=False)
    resumed = run_training(config)

    a, b = load_file(whole.weights_file), load_file(resumed.weights_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["val_acc"] for m in whole.history] == [m["val_acc"] for m in resumed.history]
    # head_only: the cache fills in epoch 0 (by row index) and serves epochs 1 and 2.
    cached = run_training(
        _run_config(tmp_path, folder, name="cached", policy={"type": "head_only"}, **common)
    )
    assert [m["feature_cache"] for m in cached.history] == [0, 1, 1]
    plain = run_training(
        _run_config(
            tmp_path,
            folder,
            name="plain",
            policy={"type": "head_only"},
            performance={"feature_cache": False},
            **common,
        )
    )
    # The first epoch reads the same images in the same order either way.
    assert cached.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"])


@pytest.mark.ray
def test_two_workers_train_from_s3_with_ray_data(
    ray_session, folder, s3_endpoint, s3_bucket, tmp_path
):
    from object_store import upload_folder

    uri = upload_folder(s3_endpoint, folder, s3_bucket, "pets")
    config = _run_config(
        tmp_path, uri, name="s3-2w", epochs=2, scaling={"num_workers": 2}, policy={"type": "full"}
    )
    outcome = run_training(config, progress=False)

    assert [m["epoch"] for m in outcome.history] == [0, 1]
    assert outcome.metrics["replicas_in_sync"] == 1
    assert np.isfinite(outcome.metrics["val_loss"]) and 0 <= outcome.metrics["val_acc"] <= 1
    local = build_datasets(_data(folder, val_fraction=0.25), timm.create_model("test_resnet"))
    assert ray_data.image_table(config.data).classes == local[0].classes
    # Every train row once per epoch (padded to 2 x 9 rows), the whole val set: on two
    # ranks, each with its 9 rows an epoch.
    assert outcome.metrics["train_images"] == 2 * 2 * 9
    assert outcome.metrics["world_size"] == 2
    assert outcome.metrics["train_images/rank0"] == outcome.metrics["train_images/rank1"] == 2 * 9
    assert outcome.metrics["val_images"] == len(local[1]) == 6


@pytest.mark.ray
def test_two_workers_killed_after_an_epoch_resume_to_the_uninterrupted_weights(
    ray_session, folder, tmp_path
):
    from faults import KillRankAfterEpoch

    # No augmentation, no cache: every epoch reads every image through Ray Data.
    common = {
        "data": {"loader": "ray_data"},
        "epochs": 3,
        "scaling": {"num_workers": 2},
        "policy": {"type": "full"},
        "performance": {"feature_cache": False},
    }
    whole = run_training(_run_config(tmp_path, folder, name="whole-2w", **common), progress=False)
    marker = tmp_path / "killed"
    config = _run_config(tmp_path, folder, name="killed-2w", max_failures=1, **common)
    # Rank 1 dies right after its report of epoch 1: the new worker group resumes from a
    # checkpoint on disk and reads epoch 2 (and epoch 1 again, if it resumes from 0's).
    resumed = run_training(config, reporter=KillRankAfterEpoch(1, 1, marker), progress=False)

    assert marker.exists(), "the fault was not injected"
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2]
    a, b = load_file(whole.weights_file), load_file(resumed.weights_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_acc"] == whole.metrics["val_acc"]
    assert resumed.metrics["replicas_in_sync"] == 1
    # Two ranks before and after the restart, each with its 9 rows an epoch.
    for outcome in (whole, resumed):
        assert outcome.metrics["world_size"] == 2
        assert outcome.metrics["train_images/rank0"] == 3 * 9
        assert outcome.metrics["train_images/rank1"] == 3 * 9


# -- corrupt images --------------------------------------------------------------------


@pytest.fixture
def corrupt_folder(tmp_path) -> Path:
    root = _jpeg_folder(tmp_path / "images", per_class=4)
    (root / "bee" / "02.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.mark.ray
def test_a_corrupt_image_is_named_or_skipped_and_counted(
    ray_session, corrupt_folder, tmp_path, capsys
):
    from ray.exceptions import RayError

    config = _run_config(
        tmp_path, corrupt_folder, name="bad", epochs=1, data={"loader": "ray_data"}
    )
    with pytest.raises((RayError, DataError), match=r"bee/02.jpg.*skip_corrupt"):
        run_training(config, progress=False)

    config = _run_config(
        tmp_path,
        corrupt_folder,
        name="skip",
        epochs=1,
        data={"loader": "ray_data", "skip_corrupt": True},
    )
    outcome = run_training(config, progress=False)
    # 12 images, 3 to val (one per class), 9 train: the corrupt one is dropped from
    # whichever split holds it, and counted.
    seen = outcome.metrics["train_images"] + outcome.metrics["val_images"]
    assert seen == 12 - 1
    assert "skipped 1 corrupt image(s)" in capsys.readouterr().out


# -- bad input: refused on the driver, before Ray, MLflow or a run directory ----------


def _refused(tmp_path, capsys, root) -> str:
    import yaml

    from freezelab.cli import main

    config = merge(TINY, {"storage_path": str(tmp_path / "runs")})
    config["data"] = {"kind": "image_folder", "root": root, "input_size": 32}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    return err


def test_object_store_roots_that_cannot_be_used_are_refused_up_front(
    folder, s3_endpoint, s3_bucket, tmp_path, capsys, monkeypatch
):
    from object_store import s3_client, upload_folder

    assert "does not exist" in _refused(tmp_path, capsys, f"s3://{s3_bucket}/nothing-here")
    assert "no such bucket" in _refused(tmp_path, capsys, "s3://no-such-bucket-18/pets")
    client = s3_client(s3_endpoint)
    client.put_object(
        Bucket=s3_bucket, Key="one/ant/0.jpg", Body=(folder / "ant/00.jpg").read_bytes()
    )
    assert "has one class folder ('ant')" in _refused(tmp_path, capsys, f"s3://{s3_bucket}/one")
    client.put_object(Bucket=s3_bucket, Key="one/bee/notes.txt", Body=b"x")
    err = _refused(tmp_path, capsys, f"s3://{s3_bucket}/one")
    assert "no image files" in err and "'bee'" in err
    uri = upload_folder(s3_endpoint, folder, s3_bucket, "ok")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert "endpoint unreachable" in _refused(tmp_path, capsys, uri)


@pytest.mark.ray
def test_workers_leave_a_cpu_to_ray_datas_tasks(ray_session, tiny_config):
    from freezelab.errors import ConfigError
    from freezelab.trainers.launch import RAY_DATA_CPUS, worker_resources

    two = tiny_config(scaling={"num_workers": 2})
    assert worker_resources(two, spare_cpus=RAY_DATA_CPUS) == {"CPU": 0.5}
    assert worker_resources(two) == {"CPU": 1.0}  # the DataLoader path: as before
    greedy = tiny_config(scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}})
    with pytest.raises(ConfigError, match="leave 0 of 2 CPUs for Ray Data's read and decode"):
        worker_resources(greedy, spare_cpus=RAY_DATA_CPUS)
