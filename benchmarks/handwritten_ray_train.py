"""A minimal hand-written Ray Train script: the baseline of ``train_overhead.py``.

The job that ``freezelab train`` runs for the config in ``train_overhead.py``, written
the way Ray Train's own examples write it: scikit-learn's digits upscaled, a timm
ResNet whose layers below the last stage are frozen (their BatchNorm kept in eval
mode), SGD over the trainable parameters, and every epoch a validation pass and a
report with metrics and a checkpoint (model and optimizer).

    python benchmarks/handwritten_ray_train.py --storage handwritten_runs
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm uses


def digits(size: int, per_class: int, val_fraction: float, seed: int):
    """Train and val sets: each digit gives round(n * val_fraction) images to val and at
    most ``per_class`` to train."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    images = (images.expand(-1, 3, -1, -1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    labels = torch.from_numpy(bunch.target).long()
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val.append(members[:n_val])
        train.append(members[n_val : n_val + per_class])
    train, val = torch.cat(train), torch.cat(val)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import timm

    torch.manual_seed(config["seed"])
    model = timm.create_model(config["model"], num_classes=10)
    if config["cuda"]:
        model = model.to(memory_format=torch.channels_last)
    # The policy: only the last stage and the classifier train.
    trainable = ("layer4", "fc")
    frozen = [module for name, module in model.named_children() if name not in trainable]
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.split(".")[0] in trainable
    model = ray.train.torch.prepare_model(model)

    train_set, val_set = digits(
        config["size"], config["per_class"], config["val_fraction"], config["seed"]
    )
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_set, batch_size=config["batch"], shuffle=True)
    )
    val_loader = ray.train.torch.prepare_data_loader(
        DataLoader(val_set, batch_size=config["batch"])
    )
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=config["lr"], momentum=0.9
    )

    # bf16 autocast on a GPU (the images stay NCHW: the first convolution converts them)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config["cuda"])
    for epoch in range(config["epochs"]):
        if ray.train.get_context().get_world_size() > 1:
            train_loader.sampler.set_epoch(epoch)
        model.train()
        for module in frozen:  # frozen BatchNorm keeps its running statistics
            module.eval()
        for images, labels in train_loader:
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val_loader:
                with autocast:
                    correct += int((model(images).argmax(1) == labels).sum())
                total += len(labels)
        metrics = {"epoch": epoch, "val_acc": correct / max(total, 1)}

        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    os.path.join(directory, "checkpoint.pt"),
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=32, help="training images per digit")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="handwritten")
    parser.add_argument("--storage", required=True, help="a directory for the run")
    parser.add_argument("--cuda", action="store_true", help="one GPU per worker, bf16")
    args = parser.parse_args()

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_func,
        train_loop_config=vars(args),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.cuda),
        run_config=RunConfig(
            name=args.name,
            storage_path=os.path.abspath(args.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    print(f"handwritten: val_acc {(result.metrics or {}).get('val_acc', float('nan')):.4f}")


if __name__ == "__main__":
    main()
