"""Wall time of ``freezelab train`` against a minimal hand-written Ray Train script.

Both sides run the same job as a fresh process, each starting its own local Ray: a
ResNet-18 on scikit-learn's digits (upscaled), the same train and val sizes, batch,
epochs and SGD, ``last_n(n=1, stage)``, 2 Ray Train workers, a checkpoint every epoch.
The baseline is ``handwritten_ray_train.py``. The freezelab side is the real command
line, ``python -m freezelab train CONFIG --set name=... --set mlflow.enabled=false``
(like for like); a third side runs it with MLflow on (a sqlite store), so its cost
shows too, and a fourth with MLflow on but no logged model, which splits that cost.
Every run has a name and a storage directory of its own, so nothing resumes.
The sides alternate round-robin, and the first side rotates between rounds.

    python benchmarks/train_overhead.py --repeats 4 --json train_overhead.json
    python benchmarks/train_overhead.py --smoke

``--smoke`` runs the first two sides in Ray Train's local mode (no workers, no Ray
start-up) and leaves out the MLflow side, whose sqlite set-up alone takes 15 s here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import yaml

# freezelab train may take at most this many times the hand-written script
TARGET = 1.03  # MLflow off
TARGET_MLFLOW = 1.10  # MLflow on
# The last side splits MLflow's cost: the run and its metrics without the logged model.
SIDES = ("handwritten", "freezelab", "freezelab+mlflow", "freezelab+mlflow-no-model")
VAL_ACC = re.compile(r"val_acc (\d\.\d+)")


def config_for(args, storage: Path) -> dict[str, Any]:
    """The train config of the job (name and MLflow are set per run on the command line)."""
    cuda = args.device == "cuda"
    return {
        "name": "bench-train-overhead",
        "model": {"name": args.model},
        "data": {
            "kind": "digits",
            "input_size": args.size,
            "train_per_class": args.per_class,
            "val_fraction": 0.1,
        },
        "policy": {"type": "last_n", "n": 1, "unit": "stage"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "schedule": {"name": "constant"},
        "scaling": {"num_workers": args.workers, "use_gpu": cuda},
        # The cache would skip the frozen layers from the second epoch on: off, so both
        # sides compute the same thing.
        "performance": {
            "feature_cache": False,
            "amp": "bf16" if cuda else None,
            "channels_last": cuda,
        },
        "checkpoint": {"every": 1, "keep": 2},
        "storage_path": str(storage / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{storage / 'mlflow.db'}"},
    }


def command(side: str, args, config_file: Path, run_dir: Path, name: str) -> list[str]:
    if side == "handwritten":
        script = Path(__file__).with_name("handwritten_ray_train.py")
        return [
            sys.executable, str(script), "--model", args.model, "--size", str(args.size),
            "--per-class", str(args.per_class), "--batch", str(args.batch),
            "--epochs", str(args.epochs), "--workers", str(args.workers),
            "--name", name, "--storage", str(run_dir), *(["--cuda"] if args.device == "cuda" else []),
        ]  # fmt: skip
    mlflow = "true" if "mlflow" in side else "false"
    no_model = ["--set", "mlflow.log_model=false"] if side.endswith("no-model") else []
    return [
        sys.executable, "-m", "freezelab", "train", str(config_file),
        "--set", f"name={name}", "--set", f"storage_path={run_dir}",
        "--set", f"mlflow.enabled={mlflow}", *no_model,
    ]  # fmt: skip


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=4)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--per-class", type=int, default=32, help="training images per digit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = p.parse_args()
    _common.check_device(args.device)
    if args.smoke:  # local mode on both sides: no Ray start-up in CI
        args.model, args.size, args.per_class, args.epochs, args.workers, args.repeats = (
            "test_resnet", 32, 4, 1, 0, 1
        )  # fmt: skip
    sides = SIDES[:2] if args.smoke else SIDES
    walls: dict[str, list[float]] = {side: [] for side in sides}
    accuracy: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as root:
        config_file = Path(root) / "job.yaml"
        config = config_for(args, Path(root))
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        for index in range(args.repeats):
            order = sides[index % len(sides) :] + sides[: index % len(sides)]
            for side in order:
                name = f"bench-{side.replace('+', '-')}-{index}"
                run_dir = Path(root) / name
                started = time.perf_counter()
                done = subprocess.run(
                    command(side, args, config_file, run_dir, name),
                    capture_output=True,
                    text=True,
                    cwd=root,
                )
                walls[side].append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise SystemExit(
                        f"{side} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                    )
                found = VAL_ACC.findall(done.stdout)
                accuracy[side].append(float(found[-1]) if found else float("nan"))
                print(f"  round {index} {side}: {walls[side][-1]:.1f} s", flush=True)
        train_images = _train_images(config)
        flops = _common.train_step_flops(_validated(config)) if args.device == "cuda" else None
    base = _common.summary(walls["handwritten"])["median"]
    rows = []
    for side in sides:
        stats = _common.summary(walls[side])
        # The ratio within each round (the sides of a round run back to back): a load
        # spike that spans a round hits both sides, one between rounds does not count.
        paired = _common.summary(
            [a / b for a, b in zip(walls[side], walls["handwritten"], strict=True)]
        )
        row = {
            "side": side,
            "wall_s": stats["median"],
            "min_s": stats["min"],
            "max_s": stats["max"],
            "ratio_vs_handwritten": stats["median"] / base,
            "round_ratio": paired["median"],
            "round_ratio_min": paired["min"],
            "round_ratio_max": paired["max"],
            "final_val_acc": _common.summary(accuracy[side])["median"],
            "runs": stats["n"],
        }
        if args.device == "cuda":  # over the whole wall time, start-up included
            images_per_s = train_images * args.epochs / stats["median"]
            # Batches of all workers together; each worker has a GPU of its own.
            steps_per_s = -(-train_images // args.batch) * args.epochs / stats["median"]
            row["images_per_s"] = images_per_s
            gpus = max(args.workers, 1)
            row["mfu"] = _common.mfu(flops * steps_per_s / gpus, args.peak_tflops)
        rows.append(row)
    verdicts = [f"off {_verdict(rows[1]['ratio_vs_handwritten'], TARGET)}"]
    if len(rows) > 2:
        verdicts.append(f"on {_verdict(rows[2]['ratio_vs_handwritten'], TARGET_MLFLOW)}")
    title = (
        f"train_overhead: {args.model} {args.size}x{args.size}, digits ({train_images} train "
        f"images), batch {args.batch}, {args.epochs} epochs, {args.workers} workers x "
        f"{args.repeats} repeats, device {args.device} (MLflow {', '.join(verdicts)})"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "train_overhead", args, rows)


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x, target <= {target:g}x: {'met' if ratio <= target else 'MISSED'}"


def _validated(config: dict[str, Any]):
    from freezelab.trainers.config import validate_config

    return validate_config(config)


def _train_images(config: dict[str, Any]) -> int:
    import timm

    from freezelab.trainers.data import build_datasets

    validated = _validated(config)
    model = timm.create_model("test_resnet", num_classes=10)
    return len(build_datasets(validated.data, model)[0])


if __name__ == "__main__":
    main()
