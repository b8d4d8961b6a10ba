"""ASHA against the full grid: the same policies, the same epoch budget per trial.

Each repeat runs two sweeps with freezelab's own machinery (``load_sweep`` and
``run_sweep``) in one Ray session, started before the clock: the grid over the policies
with every trial trained to the last epoch, and the same grid under ASHA (grace period
1, reduction factor 2), in alternating order, after an untimed warm-up sweep. Both
sweeps of a repeat use the same seed; repeats use seeds 0, 1, ... Reported: wall time,
the trial-epochs trained, the trials stopped early, the best policy each finds (by
val_acc at any epoch, as ``run_sweep`` picks it) and its val_acc. MLflow is off on
both sides. ``--smoke`` skips the warm-up.

    python benchmarks/sweep_efficiency.py --repeats 2 --json sweep_efficiency.json
    python benchmarks/sweep_efficiency.py --smoke

With ``--device cuda`` each trial's worker takes a GPU (bf16, channels_last) and the rows
add the training images per second over the sweep's wall time. Model FLOPs utilisation
is left out: the policies of a sweep differ in FLOPs per step by up to 4x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import yaml

POLICIES = [
    {"type": "full"},
    {"type": "head_only"},
    {"type": "last_n", "n": 1},
    {"type": "last_n", "n": 2},
    {"type": "bitfit"},
    {"type": "lp_ft", "probe_epochs": 1},
]


def sweep_file(args, root: Path, name: str, asha: bool, seed: int) -> Path:
    base = {
        "name": "base",
        "model": {"name": args.model},
        "data": {"kind": "digits", "input_size": args.size, "train_per_class": args.per_class},
        "policy": {"type": "full"},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "seed": seed,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scaling": {"num_workers": 1, "use_gpu": args.device == "cuda"},
        "performance": {
            "amp": "bf16" if args.device == "cuda" else None,
            "channels_last": args.device == "cuda",
        },
        "storage_path": str(root / "runs"),
        "mlflow": {"enabled": False},
    }
    sweep = {
        "name": name,
        "base": base,
        "algorithm": "grid",
        "metric": "val_acc",
        "mode": "max",
        "space": {"policies": POLICIES[: args.policies]},
    }
    if asha:
        sweep["asha"] = {"grace_period": 1, "reduction_factor": 2}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=40, help="training images per digit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6, help="the budget of a trial")
    p.add_argument("--policies", type=int, default=len(POLICIES), help="how many of the list")
    args = p.parse_args()
    _common.check_device(args.device)
    if args.smoke:
        args.model, args.per_class, args.epochs, args.policies, args.repeats = (
            "test_resnet", 8, 1, 1, 1
        )  # fmt: skip
    import ray

    from freezelab.sweep.run import run_sweep
    from freezelab.sweep.space import load_sweep

    ray.init()  # once, before the clock: neither side pays for Ray's start-up
    results: dict[str, list[dict[str, Any]]] = {"grid": [], "asha": []}
    with tempfile.TemporaryDirectory() as root:
        if not args.smoke:
            # The first sweep of a session also starts Ray's worker processes (7 s more
            # here): an untimed one-trial, one-epoch sweep pays for that.
            warm = argparse.Namespace(**{**vars(args), "policies": 1, "epochs": 1})
            run_sweep(load_sweep(sweep_file(warm, Path(root), "bench-warm-up", False, seed=0)))
        for index in range(args.repeats):
            order = ("grid", "asha") if index % 2 == 0 else ("asha", "grid")
            for side in order:
                name = f"bench-{side}-{index}"
                path = sweep_file(args, Path(root), name, side == "asha", seed=index)
                started = time.perf_counter()
                outcome = run_sweep(load_sweep(path))
                wall = time.perf_counter() - started
                best = max(
                    (r for r in outcome.rows if r["policy"] == outcome.best_policy),
                    key=lambda r: r["best_val_acc"] or 0.0,
                )
                results[side].append(
                    {
                        "wall_s": wall,
                        "trial_epochs": sum(r["epochs"] for r in outcome.rows),
                        "train_images": _train_images(args),
                        "stopped_early": sum(bool(r["stopped_early"]) for r in outcome.rows),
                        "best_policy": json.dumps(outcome.best_policy, sort_keys=True),
                        "best_val_acc": best["best_val_acc"],
                        # What a trial costs besides its training passes: Tune's time
                        # for the trial (from its function's start) minus train_time_s.
                        "fixed_per_trial_s": statistics.median(
                            r["time_s"] - r["train_time_s"] for r in outcome.rows
                        ),
                    }
                )
                print(
                    f"  round {index} {side}: {wall:.0f} s, best {results[side][-1]['best_policy']}"
                    f" at val_acc {best['best_val_acc']:.3f}",
                    flush=True,
                )
    grid_wall = statistics.median(r["wall_s"] for r in results["grid"])
    rows = []
    for side in ("grid", "asha"):
        runs = results[side]
        stats = _common.summary([r["wall_s"] for r in runs])
        rows.append(
            {
                "sweep": side,
                "wall_s": stats["median"],
                "min_s": stats["min"],
                "max_s": stats["max"],
                "time_vs_grid": stats["median"] / grid_wall,
                "trial_epochs": statistics.median(r["trial_epochs"] for r in runs),
                "stopped_early": statistics.median(r["stopped_early"] for r in runs),
                "best_policies": " / ".join(r["best_policy"] for r in runs),
                "best_val_acc": statistics.median(r["best_val_acc"] for r in runs),
                "fixed_per_trial_s": statistics.median(r["fixed_per_trial_s"] for r in runs),
            }
        )
        if args.device == "cuda":
            rows[-1]["images_per_s"] = statistics.median(
                r["trial_epochs"] * r["train_images"] / r["wall_s"] for r in runs
            )
    same = [
        g["best_policy"] == a["best_policy"]
        for g, a in zip(results["grid"], results["asha"], strict=True)
    ]
    title = (
        f"sweep_efficiency: {args.policies} policies x {args.epochs} epochs, {args.model} on "
        f"digits {args.size}x{args.size}, {args.repeats} repeats; same best policy in "
        f"{sum(same)} of {len(same)} repeats"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.write_json(args.json, "sweep_efficiency", args, rows)


def _train_images(args) -> int:
    """Training images per trial-epoch (digits capped at ``per_class`` per digit)."""
    import timm

    from freezelab.trainers.config import DataConfig
    from freezelab.trainers.data import build_datasets

    data = DataConfig(kind="digits", input_size=args.size, train_per_class=args.per_class)
    return len(build_datasets(data, timm.create_model("test_resnet"))[0])


if __name__ == "__main__":
    main()
