"""advise_vs_sweep: ``freezelab advise``'s ranking against the sweep's, on the demo's tasks.

The demo's pretraining (``freezelab.study``'s built-in study: ResNet-18 on digits 0-4 at
32x32, 4 epochs) runs once, in this process (or ``--weights`` names its result from an
earlier run). Then, for each target task, ``advise`` ranks the study's six candidate
policies (those the demo's sweep compares), and every candidate is fine-tuned under 3
seeds with the study's fine-tuning config (digits 5-9, 20 labels per class, 8 epochs),
each run in this process (``num_workers: 0``) with MLflow, shifted evaluations and the
forgetting probe off. The tasks: the demo's two variants
(``new-digits``, ``new-digits-inverted``) and a third that freezelab builds offline,
``source-digits-relabelled`` (the pretraining digits 0-4 with their labels reversed, 20
per class: a shift of the labels alone).

Reported per task: Spearman's rank correlation between advise's scores and the sweep's
mean val_acc (the last epoch's) over the seeds, and its 95% interval over the three
per-seed rankings; whether advise's first pick is in the sweep's top 2 (by mean); and
advise's wall time over the sweep's (the sum of its runs' wall times).

    python benchmarks/advise_vs_sweep.py --json advise_vs_sweep.json
    python benchmarks/advise_vs_sweep.py --smoke
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

TASKS: dict[str, dict[str, Any]] = {
    "new-digits": {},
    "new-digits-inverted": {"data": {"shift": "invert"}},
    "source-digits-relabelled": {"data": {"classes": [4, 3, 2, 1, 0]}},
}
# --smoke: the study shrunk to seconds. A tiny model; a pretraining that only has to
# give weights (one epoch on 30 images per digit); a tenth of the images for validation;
# one torch thread (two on a busy 2-core machine wait for each other whenever one is
# descheduled); three policies, two seeds and four epochs each, so that the sweep costs
# several times advise's one look at the model (the claim the smoke test reads).
SMOKE = [
    "base.model.name=test_resnet",
    "base.data.val_fraction=0.1",
    "base.performance.torch_threads=1",
    "pretrain.epochs=1",
    "pretrain.data.train_per_class=30",
    "finetune.epochs=4",
]
SMOKE_SEEDS, SMOKE_POLICIES = 2, 3
# What the benchmark leaves out of the study's fine-tuning runs: measurement it does not
# read, and MLflow.
QUIET = {
    "data": {"eval_shifts": []},
    "metrics": {"gradients": False},
    "checkpoint": {"every": 100, "keep": 1},
    "mlflow": {"enabled": False},
    "scaling": {"num_workers": 0},
}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per policy")
    p.add_argument("--weights", help="the pretrained weights (safetensors): skip the pretraining")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument(
        "--sweep-json",
        nargs="+",
        metavar="JSON",
        help="take the sweep's per-seed val_acc and wall time from these earlier --json "
        "outputs instead of fine-tuning again (advise is measured anew)",
    )
    args = p.parse_args()
    _common.check_device(args.device)
    if args.smoke:
        args.seeds = SMOKE_SEEDS
    from freezelab.api import train
    from freezelab.study import load_study, stage_config

    study = load_study(None, SMOKE if args.smoke else [])
    tasks = {name: TASKS[name] for name in (args.tasks[:1] if args.smoke else args.tasks)}
    rows, details = [], []
    with tempfile.TemporaryDirectory() as root:
        quiet = {**QUIET, "storage_path": str(Path(root) / "runs")}
        if args.device == "cuda":
            quiet["scaling"] = {"num_workers": 1, "use_gpu": True}
        started = time.perf_counter()
        weights = args.weights
        if weights is None:
            pretrain = stage_config(
                study, study.pretrain, "bench-pretrain", **_without(quiet, "data")
            )
            weights = train(pretrain, progress=False).outcome.weights_file
            print(f"  pretraining: {time.perf_counter() - started:.0f} s", flush=True)
        for task, task_overrides in tasks.items():
            stage = _merge(_merge(study.finetune, task_overrides), quiet)
            base = stage_config(
                study, stage, f"bench-{task}", policy={"type": "full"}, model={"weights": weights}
            )
            earlier = _earlier_sweep(args.sweep_json, task) if args.sweep_json else None
            row, table = _compare(args, train, base, task, study.policies, earlier)
            rows.append(row)
            details += table
            print(f"  {task}: {row}", flush=True)
            _common.write_json(args.json, "advise_vs_sweep", args, rows + details)  # so far
    title = (
        f"advise_vs_sweep: {study.base['model']['name']}, {args.seeds} seeds per policy, "
        f"{len(rows)} tasks"
    )
    _common.print_table(title, list(rows[0]), rows)
    _common.print_table("each policy, advise's score and the sweep's", list(details[0]), details)
    _common.write_json(args.json, "advise_vs_sweep", args, rows + details)


def _earlier_sweep(paths: list[str], task: str) -> tuple[dict[str, list[float]], float]:
    """Per-seed val_acc by policy label, and the sweep's wall time, of ``task`` in an
    earlier run's JSON."""
    import json

    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        summary = [r for r in rows if r.get("task") == task and "sweep_s" in r]
        if summary:
            accuracy = {
                r["policy"]: [float(a) for a in r["val_acc_by_seed"].split()]
                for r in rows
                if r.get("task") == task and "val_acc_by_seed" in r
            }
            return accuracy, summary[0]["sweep_s"]
    raise SystemExit(f"--sweep-json: no task {task!r} in {', '.join(paths)}")


def _compare(
    args,
    train,
    base,
    task: str,
    policies: list[dict[str, Any]],
    earlier: tuple[dict[str, list[float]], float] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from scipy.stats import spearmanr

    from freezelab.advise.candidates import distinct_valid
    from freezelab.advise.measure import advise
    from freezelab.policies import from_dict
    from freezelab.stats import summarize
    from freezelab.trainers.preflight import build_unallocated

    started = time.perf_counter()
    chosen = [from_dict(p) for p in (policies[:SMOKE_POLICIES] if args.smoke else policies)]
    candidates = distinct_valid(build_unallocated(base), chosen, base.epochs)
    advice = advise(base, candidates)
    advise_s = time.perf_counter() - started
    scores = {r.policy.label(): r.score for r in advice.ranking}
    accuracy: dict[str, list[float]] = {p.label(): [] for p in candidates}
    sweep_s = 0.0
    if earlier is not None:
        accuracy, sweep_s = earlier
    for seed in range(0 if earlier else args.seeds):  # round-robin: load hits all alike
        for policy in candidates:
            config = base.model_copy(
                update={
                    "policy": policy,
                    "seed": seed,
                    "name": f"{base.name}-{policy.slug()}-seed{seed}",
                }
            )
            tracked = train(config, progress=False)
            sweep_s += tracked.wall_time_s
            accuracy[policy.label()].append(tracked.outcome.metrics["val_acc"])
    labels = [p.label() for p in candidates]
    means = {label: statistics.mean(accuracy[label]) for label in labels}
    advised = [scores[label] for label in labels]
    per_seed = [
        float(spearmanr(advised, [accuracy[label][seed] for label in labels]).statistic)
        for seed in range(len(accuracy[labels[0]]))
    ]
    per_seed = [0.0 if value != value else value for value in per_seed]  # nan: a constant side
    interval = summarize(per_seed)
    by_sweep = sorted(labels, key=lambda label: -means[label])
    first = advice.ranking[0].policy.label()
    row = {
        "task": task,
        "policies": len(labels),
        "spearman": float(spearmanr(advised, [means[label] for label in labels]).statistic),
        "spearman_seed_mean": interval.mean,
        "ci95_low": interval.ci95_low,
        "ci95_high": interval.ci95_high,
        "advise_first": first,
        "sweep_top2": " / ".join(by_sweep[:2]),
        "first_in_top2": first in by_sweep[:2],
        "first_sweep_rank": by_sweep.index(first) + 1,
        "advise_s": advise_s,
        "sweep_s": sweep_s,
        "time_fraction": advise_s / sweep_s,
    }
    advise_rank = {r.policy.label(): i for i, r in enumerate(advice.ranking, 1)}
    table = [
        {
            "task": task,
            "policy": label,
            "advise_score": scores[label],
            "advise_rank": advise_rank[label],
            "val_acc_mean": means[label],
            "val_acc_ci95": _half_width(accuracy[label]),
            "sweep_rank": by_sweep.index(label) + 1,
            "val_acc_by_seed": " ".join(f"{a:.3f}" for a in accuracy[label]),
        }
        for label in sorted(labels, key=lambda label: advise_rank[label])
    ]
    return row, table


def _half_width(values: list[float]) -> float | None:
    from freezelab.stats import summarize

    found = summarize(values)
    return None if found.ci95_high is None else found.ci95_high - found.mean


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    from freezelab.trainers.config import deep_merge

    return deep_merge(base, update)


def _without(section: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in section.items() if k not in keys}


if __name__ == "__main__":
    main()
