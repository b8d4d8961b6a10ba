"""Epoch time of ``head_only`` with and without the frozen-feature cache.

Runs ``freezelab.trainers.launch.run_training`` in local mode (``num_workers: 0``, no
MLflow) on synthetic data, alternating cache on and off across repeats, and reads each
epoch's ``epoch_time_s`` from ``outcome.history``. The first epoch fills the cache
(it runs the backbone like the uncached run), so only the epochs after it count.

    python benchmarks/feature_cache.py --repeats 2 --json feature_cache.json
    python benchmarks/feature_cache.py --smoke
"""

from __future__ import annotations

import tempfile
from typing import Any

import _common

TARGET = 10.0  # the cached epochs must be at least this many times faster
# --smoke: test_resnet at 128 px, where its backbone costs many times the loop around it
# (at 32 px it costs less: the cache cannot show), and 5 epochs after the first, so that
# a slow epoch or two on a shared machine do not decide the median. One torch thread:
# two threads on a busy 2-core machine wait for each other whenever one is descheduled,
# which stretched a cached epoch of milliseconds 50-fold.
SMOKE = {"size": 128, "samples": 96, "batch": 32, "epochs": 6}


def config_for(args, cache: bool, storage: str, index: int) -> dict[str, Any]:
    return {
        "name": f"bench-cache-{'on' if cache else 'off'}-{index}",
        "model": {"name": args.model},
        "data": {
            "kind": "synthetic",
            "num_samples": args.samples,
            "num_classes": 2,
            "input_size": args.size,
        },
        "policy": {"type": "head_only"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "scaling": {"num_workers": 0, "use_gpu": args.device == "cuda"},
        "performance": {
            "feature_cache": cache,
            "amp": "bf16" if args.device == "cuda" else None,
            "channels_last": args.device == "cuda",
            "torch_threads": 1 if args.smoke else None,
        },
        "checkpoint": {"every": args.epochs, "keep": 1},
        "storage_path": storage,
        "mlflow": {"enabled": False},
    }


def main() -> None:
    args = _common.training_run_args(
        __doc__.splitlines()[0], repeats=2, model="vgg16", samples=160, batch=16, smoke=SMOKE
    )
    from freezelab.trainers.config import validate_config
    from freezelab.trainers.launch import run_training

    epoch_times: dict[bool, list[float]] = {True: [], False: []}
    first_epoch: dict[bool, list[float]] = {True: [], False: []}
    images_per_s: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as storage:
        for index in range(args.repeats):
            for cache in (True, False):  # alternate on and off
                config = validate_config(config_for(args, cache, storage, index))
                history = run_training(config).history
                first_epoch[cache].append(history[0]["epoch_time_s"])
                for metrics in history[1:]:
                    epoch_times[cache].append(metrics["epoch_time_s"])
                    images_per_s[cache].append(metrics["images_per_s"])
                    if cache and not metrics["feature_cache"]:
                        raise SystemExit("the feature cache was not used after the first epoch")
    off = _common.summary(epoch_times[False])["median"]
    rows = []
    for cache in (False, True):
        stats = _common.summary(epoch_times[cache])
        rows.append(
            {
                "model": args.model,
                "feature_cache": "on" if cache else "off",
                "epoch_s": stats["median"],
                "min_s": stats["min"],
                "max_s": stats["max"],
                "speedup_vs_off": off / stats["median"],
                "first_epoch_s": _common.summary(first_epoch[cache])["median"],
                "images_per_s": _common.summary(images_per_s[cache])["median"],
                "epochs_counted": stats["n"],
            }
        )
    speedup = rows[1]["speedup_vs_off"]
    title = (
        f"feature_cache: head_only, {args.size}x{args.size}, {args.samples} samples, "
        f"batch {args.batch}, {args.epochs} epochs x {args.repeats} repeats, device {args.device}"
        f" (epochs after the first; target >= {TARGET:g}x: "
        f"{'met' if speedup >= TARGET else 'MISSED'})"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "feature_cache", args, rows)


if __name__ == "__main__":
    main()
