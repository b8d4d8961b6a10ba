"""Image folders through Ray Data: streaming reads (local or object storage), decoding and
timm's transform on any node's CPUs, and each rank's batches from its dataset shard.

The driver lists the folder (``image_files``), splits it with the DataLoader path's own
seeded functions (``splits.folder_split``), and builds one dataset per rank and split:
``train_<rank>`` holds that rank's rows of a seeded permutation of the training set,
padded to equal length as ``DistributedSampler`` pads, so every rank takes the same
number of steps; ``val_<rank>`` (and ``test_<rank>`` with a held-out test split) holds
every ``world_size``-th validation (test) row, as the DataLoader path's evaluation does
(the whole set, no padding). A Ray Data task reads a block of files through pyarrow,
decodes each with PIL as torchvision's loader does, and applies the model's timm
transform: the same tensors as the DataLoader path.

Order: each rank's rows arrive in their seeded order (``preserve_order``), through a
local shuffle buffer seeded by (seed, epoch, rank). Without augmentation, an epoch's
batches on each rank are a function of (seed, epoch, rank, world size): a resumed run
sees what the uninterrupted one saw.

>>> len(train_rows(10, seed=0, world_size=3, rank=2)), val_rows(10, world_size=3, rank=2)
(4, [2, 5, 8])
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from freezelab import objectstore
from freezelab.trainers import image_files
from freezelab.trainers.config import DataConfig
from freezelab.trainers.image_files import DataError
from freezelab.trainers.splits import folder_split
from freezelab.trainers.transforms import InputSpec, folder_transform, input_spec

log = logging.getLogger(__name__)

# Rows a Ray Data task reads and decodes at once (a block): large enough to amortize a
# task, small enough that a rank's first batch comes soon (64 x 224^2 float32 = 38 MB).
ROWS_PER_BLOCK = 64
# The local shuffle buffer, in decoded rows (at least a batch): 512 x 224^2 float32 is
# 300 MB per worker.
SHUFFLE_BUFFER_ROWS = 512


@dataclass(frozen=True)
class ImageTable:
    """An image folder's split: ``(file, label)`` of each train, val and test row, in
    index order, and the class names (the label order). ``test`` is None without a
    held-out test split."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]] | None = None


def image_table(config: DataConfig) -> ImageTable:
    """List ``config.root`` and split it exactly as the DataLoader path does."""
    layout = image_files.folder_layout(config.root, config.test_fraction)
    classes, train_files = image_files.image_files(layout.train)
    val_classes, val_files = (
        image_files.image_files(layout.val) if layout.val else (None, train_files)
    )
    test_classes, test_files = (
        image_files.image_files(layout.test) if layout.test else (None, train_files)
    )
    train_idx, val_idx, test_idx = folder_split(
        config,
        [label for _, label in train_files],
        classes,
        val_classes,
        len(val_files),
        test_classes,
        len(test_files),
    )
    has_test = layout.test is not None or config.test_fraction is not None
    return ImageTable(
        classes,
        [train_files[i] for i in train_idx],
        [val_files[i] for i in val_idx],
        [test_files[i] for i in test_idx] if has_test else None,
    )


def train_rows(size: int, seed: int, world_size: int, rank: int) -> list[int]:
    """The training rows of ``rank``: every ``world_size``-th of a seeded permutation,
    padded from its start to a multiple of ``world_size`` (as ``DistributedSampler``
    pads), so that every rank has the same number of rows.

    >>> [len(train_rows(10, 0, 3, r)) for r in range(3)]
    [4, 4, 4]
    >>> sorted(sum((train_rows(9, 0, 3, r) for r in range(3)), []))
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    total = math.ceil(size / world_size) * world_size
    padded = (order * math.ceil(total / size))[:total]
    return padded[rank:total:world_size]


def val_rows(size: int, world_size: int, rank: int) -> list[int]:
    """The validation rows of ``rank``: a disjoint stride, the whole set over all ranks."""
    return list(range(rank, size, world_size))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + (epoch + 1) * 7_919 + rank) % 2**31


def shard_info(config: Any, world_size: int) -> dict[str, Any]:
    """What the loop needs to read its shards: the sizes, the class names, and the
    datasets (``train_<rank>``, ``val_<rank>``, ``test_<rank>``), which the launcher
    hands to the TorchTrainer, or in one process to the loop itself."""
    from ray.data import DataContext

    # Ray Data's progress bars, from every worker, would bury the run's own lines: -v only.
    DataContext.get_current().enable_progress_bars = logging.getLogger("freezelab").isEnabledFor(
        logging.DEBUG
    )
    table = image_table(config.data)
    spec = input_spec(config.data, _unallocated_model(config, len(table.classes)))
    if spec.channels not in (1, 3):
        raise DataError(
            f"the model takes {spec.channels} input channels; image_folder gives 1 or 3"
        )
    datasets = {}
    for rank in range(world_size):
        rows = train_rows(len(table.train), config.seed, world_size, rank)
        datasets[f"train_{rank}"] = _dataset(
            [(*table.train[i], i) for i in rows], config.data, spec, config.data.augment
        )
        rows = val_rows(len(table.val), world_size, rank)
        # Val rows are keyed by their place in the rank's shard (the val feature cache).
        datasets[f"val_{rank}"] = _dataset(
            [(*table.val[i], j) for j, i in enumerate(rows)], config.data, spec, False
        )
        if table.test is not None:  # strided as val is: the whole test set, once
            rows = val_rows(len(table.test), world_size, rank)
            datasets[f"test_{rank}"] = _dataset(
                [(*table.test[i], j) for j, i in enumerate(rows)], config.data, spec, False
            )
    info = {
        "train_size": len(table.train),
        "val_size": len(table.val),
        "test_size": len(table.test) if table.test is not None else None,
        "classes": table.classes,
        "datasets": datasets,
    }
    return info


def dataset_config() -> Any:
    """Ray Train's DataConfig for these datasets: none is split by Ray (each rank reads
    its own), and order is preserved (the seeded order reaches the shuffle buffer)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig as TrainDataConfig

    return TrainDataConfig(
        datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
    )


def _unallocated_model(config: Any, num_classes: int) -> torch.nn.Module:
    from freezelab.trainers.models import build_for_config

    with torch.device("meta"):
        return build_for_config(config, with_weights=False, num_classes=num_classes)


def _dataset(rows: list[tuple[str, int, int]], data: DataConfig, spec: InputSpec, train: bool):
    import ray.data

    items = [{"file": file, "label": label, "index": index} for file, label, index in rows]
    dataset = ray.data.from_items(
        items, override_num_blocks=max(1, -(-len(items) // ROWS_PER_BLOCK))
    )
    dataset.context.execution_options.preserve_order = True
    decode = DecodeImages(data.root, spec, train, data.skip_corrupt)
    return dataset.map_batches(decode, batch_size=ROWS_PER_BLOCK, batch_format="numpy")


# One filesystem per decode process and root: an S3 client is costly to make.
_filesystem = functools.lru_cache(maxsize=4)(image_files.folder_filesystem)


@dataclass(frozen=True)
class DecodeImages:
    """A Ray Data batch transform: read each file, decode it as torchvision's loader
    does (PIL, then RGB or L), apply timm's transform (train or eval) for ``spec``.

    A file that does not decode fails with its name, or with ``skip_corrupt`` comes out
    as a blank row marked ``ok = False``, which the loop drops (and counts)."""

    root: str
    spec: InputSpec
    train: bool
    skip_corrupt: bool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        transform = folder_transform(self.spec, self.train)
        fs, base = _filesystem(self.root)
        images, ok = [], []
        for file in batch["file"]:
            file = str(file)
            try:
                with fs.open_input_stream(_path_in(file, self.root, base)) as stream:
                    data = stream.read()
            except OSError as err:
                raise DataError(
                    f"data.root: cannot read {file!r}: {objectstore.reason(err)}"
                ) from None
            try:
                with Image.open(io.BytesIO(data)) as opened:
                    image = opened.convert("L" if self.spec.channels == 1 else "RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                if not self.skip_corrupt:
                    raise DataError(
                        f"data.root: {file!r} is not an image that decodes ({err}); "
                        "set data.skip_corrupt: true to skip such files"
                    ) from None
                log.warning(f"skipped {file!r}: it does not decode ({err})")
                images.append(np.zeros((self.spec.channels, *self.spec.size), np.float32))
                ok.append(False)
                continue
            images.append(transform(image).numpy())
            ok.append(True)
        return {
            "image": np.stack(images),
            "label": batch["label"].astype(np.int64),
            "index": batch["index"].astype(np.int64),
            "ok": np.asarray(ok, dtype=bool),
        }


def _path_in(file: str, root: str, base: str) -> str:
    """The path within the root's filesystem of ``file`` (a URI or path under ``root``)."""
    if not objectstore.is_uri(root):
        return file
    return objectstore.join(base, file[len(root.rstrip("/")) :])


class ShardBatches:
    """A rank's Ray Data shard as the loop's batches, ``(images, labels, indices)`` on
    the CPU, like the DataLoader path's. ``set_epoch`` chooses the shuffle buffer's seed
    (training shards); ``cached_order`` is the order of an epoch read from the feature
    cache, also a function of (seed, epoch, rank)."""

    def __init__(
        self,
        shard: Any,
        rows: list[int],
        batch_size: int,
        *,
        seed: int | None = None,
        rank: int = 0,
        what: str = "train",
    ):
        self.shard, self.rows, self.batch_size = shard, rows, batch_size
        self.seed, self.rank, self.what = seed, rank, what
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def cached_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed or 0, self.epoch, self.rank))
        return [self.rows[i] for i in torch.randperm(len(self.rows), generator=generator)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shuffle = self.seed is not None
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            device="cpu",
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_ROWS, self.batch_size)
            if shuffle
            else None,
            local_shuffle_seed=epoch_seed(self.seed, self.epoch, self.rank) if shuffle else None,
        )
        skipped = 0
        for batch in batches:
            images, labels, indices, ok = (batch[k] for k in ("image", "label", "index", "ok"))
            if not bool(ok.all()):
                skipped += int((~ok).sum())
                if not bool(ok.any()):
                    raise DataError(
                        f"data.skip_corrupt: every image of a {self.what} batch of "
                        f"{len(ok)} was skipped; too many files do not decode"
                    )
                images, labels, indices = images[ok], labels[ok], indices[ok]
            yield images, labels, indices
        if skipped:
            log.warning(
                f"rank {self.rank}: skipped {skipped} corrupt image(s) of {len(self.rows)} in "
                f"this {self.what} pass (data.skip_corrupt)"
            )


def rank_batches(
    info: dict[str, Any], rank: int, world_size: int, batch_size: int, eval_batch: int, seed: int
) -> tuple[ShardBatches, ShardBatches, ShardBatches | None]:
    """This rank's train, val and test batches (test None without a test split): from
    the Train worker's dataset shards (``ray.train.get_dataset_shard``), or in one
    process from the datasets themselves."""
    import ray.train

    def shard(name: str) -> Any:
        datasets = info.get("datasets")
        return datasets[name].iterator() if datasets else ray.train.get_dataset_shard(name)

    train = ShardBatches(
        shard(f"train_{rank}"),
        train_rows(info["train_size"], seed, world_size, rank),
        batch_size,
        seed=seed,
        rank=rank,
    )
    val = ShardBatches(
        shard(f"val_{rank}"),
        list(range(len(val_rows(info["val_size"], world_size, rank)))),
        eval_batch,
        rank=rank,
        what="val",
    )
    test = None
    if info.get("test_size") is not None:
        test = ShardBatches(
            shard(f"test_{rank}"),
            list(range(len(val_rows(info["test_size"], world_size, rank)))),
            eval_batch,
            rank=rank,
            what="test",
        )
    return train, val, test
