"""freezelab against PyTorch Lightning's ``BackboneFinetuning``, frozen phase, ResNet-50.

Both sides fine-tune the same weights: a ResNet-50 first trained in full on the digits
0-4 (once, untimed), then fine-tuned on the digits 5-9 (scikit-learn's digits upscaled,
the same train and validation sets from ``build_datasets``) with the same batch, SGD,
learning rate and epochs, all inside the backbone's frozen phase.

- Lightning: a ``LightningModule`` whose ``backbone`` is every child of the model but
  the classifier, and ``BackboneFinetuning`` with its unfreeze epoch after the last
  one. Its ``freeze`` keeps BatchNorm trainable by default (``train_bn=True``): the BN
  layers stay in train mode and their affine parameters train, so the backward pass
  walks the whole backbone.
- freezelab: ``run_training`` in local mode with ``head_only``, whose frozen BatchNorm
  stays in eval mode with no gradient; the frozen-feature cache off. A third row has
  the cache on (freezelab's default), which skips the backbone from the second epoch.
- freezelab+bn: ``bitfit`` with ``include_norm: true``, which trains what Lightning's
  frozen phase trains (the BatchNorm affine parameters, the biases and the classifier;
  ResNet convolutions have no biases), BN in train mode: the like-for-like row.
- freezelab+adapt: ``head_only`` with ``bn: adapt`` (AdaBN) and the cache on: the frozen
  BN layers re-estimate their running statistics on the target's training images once,
  in a forward pass before the first epoch (untimed here: about one frozen epoch's
  forward), then everything stays as in ``head_only``.

No pretrained weights can be downloaded here, hence the untimed pretraining: it gives
the backbone features worth probing and BatchNorm running statistics of its own, as a
pretrained backbone has (a random ResNet-50's BN statistics are still mean 0, variance 1,
and its features collapse in eval mode).

Timed: the training pass of each epoch (data loading included, validation excluded),
as milliseconds per batch; the first epoch of a run is a warm-up. Runs alternate, and
the first side rotates. Reported too: validation accuracy after the last epoch.

    python benchmarks/lightning_compare.py --repeats 3 --json lightning_compare.json
    python benchmarks/lightning_compare.py --smoke
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import _common

TARGET = 0.7  # freezelab's frozen-phase step time at most this fraction of Lightning's
SIDES = ("lightning", "freezelab", "freezelab+cache", "freezelab+bn", "freezelab+adapt")
POLICY = {
    "freezelab+bn": {"type": "bitfit", "include_norm": True},
    # AdaBN: head_only whose frozen BN re-estimates its statistics on the target first.
    "freezelab+adapt": {"type": "head_only", "bn": "adapt"},
}
CACHED = ("freezelab+cache", "freezelab+adapt")


def config_for(args, storage: str, name: str, **changes: Any) -> dict[str, Any]:
    cuda = args.device == "cuda"
    config = {
        "name": name,
        "model": {"name": args.model},
        "data": {
            "kind": "digits",
            "classes": [5, 6, 7, 8, 9],
            "input_size": args.size,
            "train_per_class": args.per_class,
        },
        "policy": {"type": "head_only"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.9},
        "schedule": {"name": "constant"},
        "scaling": {"num_workers": 0, "use_gpu": cuda},
        "performance": {
            "feature_cache": False,
            "amp": "bf16" if cuda else None,
            "channels_last": cuda,
        },
        "checkpoint": {"every": args.epochs, "keep": 1},
        "storage_path": storage,
        "mlflow": {"enabled": False},
    }
    config.update(changes)
    return config


def pretrain(args, storage: str) -> str:
    """Train the model in full on the digits 0-4; the weights file of its last epoch."""
    from freezelab.trainers.config import validate_config
    from freezelab.trainers.launch import run_training

    data = {"kind": "digits", "classes": [0, 1, 2, 3, 4], "input_size": args.size}
    config = config_for(
        args,
        storage,
        "bench-pretrain",
        data=data,
        policy={"type": "full"},
        epochs=args.pretrain_epochs,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )
    outcome = run_training(validate_config(config))
    print(f"  pretrained on the digits 0-4: val_acc {outcome.metrics['val_acc']:.3f}", flush=True)
    return outcome.weights_file


def run_freezelab(config) -> tuple[list[float], float]:
    """Milliseconds per batch of every epoch's training pass, and the last val_acc."""
    from freezelab.trainers.launch import run_training

    history = run_training(config).history
    return [1000 * config.batch_size / m["images_per_s"] for m in history], history[-1]["val_acc"]


def lightning_module(config):
    """The LightningModule of ``config``'s model, with the ``backbone`` attribute that
    ``BackboneFinetuning`` freezes: every child of the model but its classifier."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from freezelab.trainers.feature_cache import classifier_of
    from freezelab.trainers.models import build_for_config

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_for_config(config)
            head = classifier_of(self.model)
            self.backbone = torch.nn.ModuleList(
                child for child in self.model.children() if child is not head
            )
            self.correct = self.seen = 0

        def forward(self, images):
            return self.model(images)

        def training_step(self, batch, _index):
            images, labels = batch
            return F.cross_entropy(self.model(images), labels)

        def on_validation_epoch_start(self) -> None:
            self.correct = self.seen = 0

        def validation_step(self, batch, _index):
            images, labels = batch
            self.correct += int((self.model(images).argmax(1) == labels).sum())
            self.seen += len(labels)

        def configure_optimizers(self):
            trainable = [p for p in self.parameters() if p.requires_grad]
            optimizer = config.optimizer
            return torch.optim.SGD(trainable, lr=optimizer.lr, momentum=optimizer.momentum)

    return Module()


def run_lightning(config, device: str) -> tuple[list[float], float]:
    """Milliseconds per batch of every epoch's training pass, and the last val_acc."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import BackboneFinetuning, Callback
    from torch.utils.data import DataLoader

    from freezelab.trainers.data import build_datasets

    class TrainPassTimer(Callback):
        def __init__(self) -> None:
            self.ms_per_batch: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.started, self.images, self.last = time.perf_counter(), 0, None

        def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
            self.images += len(batch[1])
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            seconds = self.last - self.started
            self.ms_per_batch.append(1000 * seconds * config.batch_size / self.images)

    module = lightning_module(config)
    train_set, val_set, _ = build_datasets(config.data, module.model)
    timer = TrainPassTimer()
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        # The backbone stays frozen for every epoch here: its frozen phase.
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=config.epochs + 1), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if device == "cuda":
        module = module.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    trainer.fit(
        module,
        DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator),
        DataLoader(val_set, batch_size=config.batch_size),
    )
    return timer.ms_per_batch, module.correct / max(module.seen, 1)


def lightning_step_flops(config) -> float:
    """FLOPs of one training step of Lightning's frozen phase (BatchNorm trainable)."""
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import BaseFinetuning
    from torch.utils.flop_counter import FlopCounterMode

    from freezelab.trainers.data import input_size_of

    module = lightning_module(config)
    BaseFinetuning.freeze(module.backbone, train_bn=True)
    module.train()
    images = torch.randn(config.batch_size, *input_size_of(config.data, module.model))
    labels = torch.randint(0, 5, (config.batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(module(images), labels).backward()
    return float(counter.get_total_flops())


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--per-class", type=int, default=40, help="training images per digit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=8, help="per run; the first is not timed")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="on the digits 0-4, untimed")
    args = p.parse_args()
    _common.check_device(args.device)
    if args.smoke:
        args.model, args.size, args.per_class, args.epochs, args.pretrain_epochs = (
            "test_resnet", 32, 8, 2, 1
        )  # fmt: skip
        args.repeats = 1
    from freezelab.trainers.config import validate_config

    ms_per_batch: dict[str, list[float]] = {side: [] for side in SIDES}
    accuracy: dict[str, list[float]] = {side: [] for side in SIDES}
    configs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as storage:
        weights = pretrain(args, storage)
        model = {"name": args.model, "weights": weights}
        for index in range(args.repeats):
            order = SIDES[index % len(SIDES) :] + SIDES[: index % len(SIDES)]
            for side in order:
                name = f"bench-{side.replace('+', '-')}-{index}"
                performance = {**config_for(args, storage, name)["performance"]}
                performance["feature_cache"] = side in CACHED
                policy = POLICY.get(side, {"type": "head_only"})
                config = validate_config(
                    config_for(
                        args, storage, name, model=model, performance=performance, policy=policy
                    )
                )
                configs[side] = config
                if side == "lightning":
                    per_epoch, acc = run_lightning(config, args.device)
                else:
                    per_epoch, acc = run_freezelab(config)
                ms_per_batch[side].extend(per_epoch[1:])
                accuracy[side].append(acc)
                print(
                    f"  round {index} {side}: {statistics.median(per_epoch[1:]):.0f} ms per "
                    f"batch, val_acc {acc:.3f}",
                    flush=True,
                )
        if args.device == "cuda":
            # The cached epochs of freezelab+cache run the classifier only: no MFU there.
            flops = {
                "lightning": lightning_step_flops(configs["lightning"]),
                "freezelab": _common.train_step_flops(configs["freezelab"]),
                "freezelab+bn": _common.train_step_flops(configs["freezelab+bn"]),
            }
    lightning_ms = statistics.median(ms_per_batch["lightning"])
    rows = []
    for side in SIDES:
        stats = _common.summary(ms_per_batch[side])
        acc = _common.summary(accuracy[side])
        row = {
            "side": side,
            "batch_ms": stats["median"],
            "min_ms": stats["min"],
            "max_ms": stats["max"],
            "time_vs_lightning": stats["median"] / lightning_ms,
            "val_acc": acc["median"],
            "val_acc_min": acc["min"],
            "val_acc_max": acc["max"],
            "epochs_timed": stats["n"],
        }
        if args.device == "cuda":
            row["images_per_s"] = 1000 * args.batch / stats["median"]
            if side in flops:
                steps_per_s = 1000 / stats["median"]
                row["mfu"] = _common.mfu(flops[side] * steps_per_s, args.peak_tflops)
        rows.append(row)
    ratio = rows[1]["time_vs_lightning"]
    title = (
        f"lightning_compare: {args.model} frozen phase, digits 5-9 at {args.size}x{args.size} "
        f"({args.per_class} train images per digit), batch {args.batch}, {args.epochs} epochs "
        f"x {args.repeats} repeats, device {args.device} "
        f"(target <= {TARGET:g}x: {'met' if ratio <= TARGET else 'MISSED'})"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "lightning_compare", args, rows)


if __name__ == "__main__":
    main()
