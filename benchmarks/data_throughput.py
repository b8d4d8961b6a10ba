"""Images per second delivered to the training loop: the DataLoader against Ray Data.

Generates a folder of JPEGs (2,000 of 500x375 in 4 classes by default), then times a
full pass over the training split at VGG16's input (224, timm's eval transform: resize,
centre crop, normalize), as the loop receives it (float32 batches of 64 on the CPU):
the DataLoader with ``num_workers`` 0 and 2, and Ray Data (``freezelab.trainers.ray_data``,
one shard, read-and-decode tasks on this machine's CPUs) from the local folder and from
a moto S3 bucket on 127.0.0.1. Paths alternate round-robin across repeats; the first
pass of each is a warm-up and is not counted. ``images_per_core_s`` divides by the
cores the path can use (1 for the DataLoader in-process, else the machine's cores).

    python benchmarks/data_throughput.py --repeats 2 --json data_throughput.json
    python benchmarks/data_throughput.py --smoke
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _common


def make_folder(root: Path, count: int, size: tuple[int, int], classes: int = 4) -> Path:
    """JPEGs of ``size`` with some texture (noise on a gradient), as photos compress."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (
            ramp + rng.normal(0, 25, (height, width, 3)).astype(np.float32) + 10 * (i % classes)
        )
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=85
        )
    return root


def train_config(root: str, args) -> Any:
    from freezelab.trainers.config import validate_config

    return validate_config(
        {
            "name": "bench-data",
            "model": {"name": args.model},
            "data": {"kind": "image_folder", "root": root, "input_size": args.size},
            "policy": {"type": "full"},
            "epochs": 1,
            "batch_size": args.batch,
            "scaling": {"num_workers": 0},
            "mlflow": {"enabled": False},
        }
    )


def dataloader_pass(config, workers: int) -> tuple[int, float]:
    import torch

    from freezelab.trainers.data import build_datasets
    from freezelab.trainers.ray_data import _unallocated_model

    train, _, _ = build_datasets(config.data, _unallocated_model(config, 4))
    loader = torch.utils.data.DataLoader(
        train, batch_size=config.batch_size, shuffle=True, num_workers=workers
    )
    started, images = time.perf_counter(), 0
    for batch, _labels in loader:
        images += len(batch)
    return images, time.perf_counter() - started


def ray_data_pass(config) -> tuple[int, float]:
    from freezelab.trainers import ray_data

    info = ray_data.shard_info(config, world_size=1)
    train, _, _ = ray_data.rank_batches(info, 0, 1, config.batch_size, config.batch_size, 0)
    started, images = time.perf_counter(), 0
    for batch, _labels, _indices in train:
        images += len(batch)
    return images, time.perf_counter() - started


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--model", default="vgg16", help="whose timm data config applies")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=224, help="input side")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    if args.smoke:
        args.model, args.images, args.width, args.height, args.size, args.batch = (
            "test_resnet",
            48,
            120,
            90,
            32,
            16,
        )
        args.repeats = 1
    import ray

    sys_path = str(_common.ROOT / "tests")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from object_store import new_bucket, start_s3, upload_folder

    cores = os.cpu_count() or 1
    endpoint = start_s3()  # before Ray, so that its workers inherit the endpoint
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "images", args.images, (args.width, args.height))
        uri = upload_folder(endpoint, folder, new_bucket(endpoint), "images")
        paths = {
            "dataloader nw=0": (lambda: dataloader_pass(train_config(str(folder), args), 0), 1),
            "dataloader nw=2": (lambda: dataloader_pass(train_config(str(folder), args), 2), cores),
            "ray_data local": (lambda: ray_data_pass(train_config(str(folder), args)), cores),
            "ray_data s3 (moto)": (lambda: ray_data_pass(train_config(uri, args)), cores),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, (run, _) in paths.items():
                images, seconds = run()
                if repeat > 0 or args.smoke:
                    rates[name].append(images / seconds)
    ray.shutdown()
    rows = []
    for name, (_, used) in paths.items():
        stats = _common.summary(rates[name])
        rows.append(
            {
                "path": name,
                "images_per_s": stats["median"],
                "min": stats["min"],
                "max": stats["max"],
                "cores": used,
                "images_per_core_s": stats["median"] / used,
                "passes": stats["n"],
            }
        )
    title = (
        f"data_throughput: {args.images} JPEGs {args.width}x{args.height} -> {args.size} "
        f"({args.model}'s eval transform), batch {args.batch}, {args.repeats} repeats, "
        f"{cores} cores"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "data_throughput", args, rows)


if __name__ == "__main__":
    main()
