"""freezelab's training epoch against a plain hand-written PyTorch loop, and the cost of
its gradient-shock metrics (the same run with ``metrics.gradients`` off).

Both sides train the same model (``build_for_config``), under the same plan, on the
same datasets and batch size, with SGD over the trainable parameters only, and then
evaluate the validation set, which is what ``epoch_time_s`` covers. The freezelab
side is ``run_training`` in local mode (``num_workers: 0``, MLflow off, feature cache
off); the plain side is the loop below. Runs alternate; the first epoch of every run
is a warm-up and is not counted.

    python benchmarks/overhead.py --repeats 3 --json overhead.json
    python benchmarks/overhead.py --smoke

``freezelab train`` against a hand-written Ray ``TorchTrainer`` script (wall time with
Ray start-up) is ``train_overhead.py``.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from typing import Any

import _common

TARGET = 1.05  # freezelab's epoch may take at most this many times the plain loop's
GRADIENTS_TARGET = 1.05  # ... and its gradient norms at most this many times no norms


def config_for(args, storage: str, index: int, gradients: bool = True) -> dict[str, Any]:
    return {
        "name": f"bench-overhead-{index}-{'grad' if gradients else 'nograd'}",
        "metrics": {"gradients": gradients},
        "model": {"name": args.model},
        "data": {
            "kind": "synthetic",
            "num_samples": args.samples,
            "num_classes": 4,
            "input_size": args.size,
        },
        "policy": {"type": "last_n", "n": 1, "unit": "stage"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "schedule": {"name": "constant"},
        "scaling": {"num_workers": 0, "use_gpu": args.device == "cuda"},
        "performance": {
            "feature_cache": False,
            "amp": "bf16" if args.device == "cuda" else None,
            "channels_last": args.device == "cuda",
        },
        "checkpoint": {"every": args.epochs, "keep": 1},
        "storage_path": storage,
        "mlflow": {"enabled": False},
    }


def plain_loop(config, device: str) -> list[float]:
    """A hand-written loop: forward, loss, backward, step; then evaluate. Epoch seconds."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from freezelab.policies import apply
    from freezelab.trainers.data import build_datasets
    from freezelab.trainers.models import build_for_config

    model = build_for_config(config).to(device)
    train_set, val_set, _ = build_datasets(config.data, model)
    apply(model, config.policy.plan(model, 0))
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, generator=generator
    )
    val_loader = DataLoader(val_set, batch_size=config.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    times = []
    for _ in range(config.epochs):
        model.train()
        started = time.perf_counter()
        loss_sum = 0.0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
        model.eval()
        correct = 0
        with torch.no_grad(), autocast:
            for images, labels in val_loader:
                images, labels = images.to(device), labels.to(device)
                correct += int((model(images).argmax(1) == labels).sum())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    args = _common.training_run_args(
        __doc__.splitlines()[0], repeats=3, model="resnet18", samples=320, batch=32
    )
    from freezelab.trainers.config import validate_config
    from freezelab.trainers.launch import run_training

    sides = ("plain", "freezelab, no gradient metrics", "freezelab")
    epoch_times: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as storage:
        for index in range(args.repeats):
            # Rotate which side goes first, so none always runs on a warmer machine.
            for side in sides[index % 3 :] + sides[: index % 3]:
                if side == "plain":
                    config = validate_config(config_for(args, storage, index))
                    times = plain_loop(config, args.device)
                else:
                    gradients = side == "freezelab"
                    config = validate_config(config_for(args, storage, index, gradients))
                    times = [m["epoch_time_s"] for m in run_training(config).history]
                epoch_times[side].extend(times[1:])
    plain = _common.summary(epoch_times["plain"])["median"]
    no_gradients = _common.summary(epoch_times[sides[1]])["median"]
    rows = []
    for side in sides:
        stats = _common.summary(epoch_times[side])
        rows.append(
            {
                "model": args.model,
                "loop": side,
                "epoch_s": stats["median"],
                "min_s": stats["min"],
                "max_s": stats["max"],
                "ratio_vs_plain": stats["median"] / plain,
                "ratio_vs_no_gradient_metrics": stats["median"] / no_gradients,
                "epochs_counted": stats["n"],
            }
        )
        if args.device == "cuda":  # the epoch also covers the validation pass
            rows[-1]["train_images_per_epoch_s"] = round(args.samples * 0.8) / stats["median"]
    ratio = rows[2]["ratio_vs_plain"]
    gradient_ratio = rows[2]["ratio_vs_no_gradient_metrics"]
    title = (
        f"overhead: last_n(n=1, stage), {args.size}x{args.size}, {args.samples} samples, "
        f"batch {args.batch}, {args.epochs} epochs x {args.repeats} repeats, device "
        f"{args.device} (target <= {TARGET:g}x the plain loop: "
        f"{'met' if ratio <= TARGET else 'MISSED'}; gradient metrics <= {GRADIENTS_TARGET:g}x: "
        f"{'met' if gradient_ratio <= GRADIENTS_TARGET else 'MISSED'})"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "overhead", args, rows)


if __name__ == "__main__":
    main()
