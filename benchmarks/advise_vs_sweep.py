"""advise_vs_sweep: ``freezelab advise``'s pick against the corrected study's verdict.

The ground truth is the transfer study as ``freezelab demo`` runs it (the built-in
study: ResNet-18 pretrained on digits 0-4 at 32x32; each policy at its own learning
rate chosen on val from {0.002, 0.01, 0.05} by successive halving; 3 seeds; the verdict
on the held-out test split), run once in this process over four target tasks that
freezelab builds offline:

- ``new-digits``: digits 5-9, 20 labels per class (the demo's first variant);
- ``new-digits-inverted``: the same, inverted (the demo's second);
- ``source-permuted``: the pretraining digits 0-4 with their labels permuted (a shift of
  the labels alone: the features fit, the head must be new);
- ``new-digits-rotated``: digits 5-9 rotated by 90 degrees (a stronger input shift than
  inversion for a network whose features are not rotation-invariant).

Then, per task, ``advise`` (its default budget, 10% of a 3-seed study's FLOPs; the
study's rate grid as ``--rates``) ranks the study's six policies on the same fine-tuning
config and the same pretrained weights, tracked in the same MLflow store.

Reported per task: advise's pick and rate; the study's best policy by mean test_acc and
the group of policies that the study cannot tell apart from it (95% interval of the
difference holding 0, Welch's t, as the study's summary says it); whether the pick is
in that group; regret (the best mean test_acc minus the pick's); Spearman's rank
correlation between advise's order and the study's means; advise's training FLOPs over
the study's (every selection and verdict run of that task, as the loop counted them,
from MLflow) and its wall time over the study's (the sum of that task's runs'
durations: the study runs the tasks side by side).

    python benchmarks/advise_vs_sweep.py --json advise_vs_sweep.json
    python benchmarks/advise_vs_sweep.py --smoke

The design of advise was settled before this ran (``freezelab/advise/search.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import yaml

TASKS: dict[str, dict[str, Any]] = {
    "new-digits": {},
    "new-digits-inverted": {"data": {"shift": "invert"}},
    "source-permuted": {"data": {"classes": [3, 0, 4, 1, 2]}},
    "new-digits-rotated": {"data": {"shift": "rotate:90"}},
}
# --smoke: one task, three policies, a tiny model and short runs; the claim it checks
# (advise spends at most its budget of the study's FLOPs) holds at any size.
SMOKE = [
    "base.model.name=test_resnet",
    "base.batch_size=16",
    "pretrain.epochs=1",
    "pretrain.data.train_per_class=30",
    "finetune.epochs=4",
    "finetune.data.eval_shifts=[]",
    "seeds=[0, 1]",
    "select.grace_epochs=1",
    "policies=[{type: full}, {type: head_only}, {type: last_n, n: 1}]",
    "register_best_as=null",
]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--budget", type=float, default=0.1, help="advise's --budget")
    args = p.parse_args()
    _common.check_device(args.device)
    import ray

    from freezelab.study import load_study

    tasks = {name: TASKS[name] for name in (args.tasks[:1] if args.smoke else args.tasks)}
    with tempfile.TemporaryDirectory(prefix="advise-bench-") as root:
        os.chdir(root)
        uri = f"sqlite:///{root}/mlflow.db"
        overrides = [
            *(SMOKE if args.smoke else []),
            f"variants={json.dumps(tasks)}",
            f"base.mlflow={json.dumps({'enabled': True, 'tracking_uri': uri})}",
            f"base.storage_path={root}/runs",
        ]
        if args.device == "cuda":
            overrides.append("finetune.scaling={num_workers: 1, use_gpu: true}")
        study = load_study(None, overrides)
        ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False)
        started = time.perf_counter()
        outcome = _run_study(overrides)
        print(f"  the study: {time.perf_counter() - started:.0f} s", flush=True)
        weights = _pretrained_weights(study, outcome.tag)
        cost = _study_cost(uri, outcome.tag)
        rows, details = [], []
        for task in tasks:
            row, table = _compare(args, study, task, weights, outcome, cost[task], root)
            rows.append(row)
            details += table
            print(f"  {task}: {row}", flush=True)
            _common.write_json(args.json, "advise_vs_sweep", args, rows + details)  # so far
        ray.shutdown()
    title = f"advise_vs_sweep: {study.base['model']['name']}, {len(rows)} tasks"
    _common.print_table(title, list(rows[0]), rows)
    _common.print_table("each policy: advise against the study", list(details[0]), details)
    _common.write_json(args.json, "advise_vs_sweep", args, rows + details)


def _run_study(overrides: list[str]) -> Any:
    from freezelab.study import run_study

    return run_study(None, overrides=overrides)


def _pretrained_weights(study: Any, tag: str) -> str:
    """The study's pretrained weights: its pretraining run again, which finds itself
    finished and hands back its file."""
    from freezelab.api import train
    from freezelab.mlflow.tracking import PRETRAIN, STAGE_TAG
    from freezelab.study import STUDY_TAG, stage_config

    pretrain = stage_config(
        study,
        study.pretrain,
        f"{tag}-pretrain",
        mlflow={"tags": {STAGE_TAG: PRETRAIN, STUDY_TAG: tag}, "run_name": "pretrain"},
    )
    return train(pretrain, progress=False).outcome.weights_file


def _study_cost(uri: str, tag: str) -> dict[str, dict[str, float]]:
    """Per task: the training FLOPs and the summed durations of the study's selection
    and verdict runs (stopped selection runs count what they trained)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`freezelab.study` = '{tag}'",
        max_results=5000,
    )
    cost: dict[str, dict[str, float]] = {}
    for run in runs:
        if run.data.tags.get("freezelab.stage") not in ("finetune", "select"):
            continue
        task = run.data.tags.get("freezelab.variant", "")
        found = cost.setdefault(task, {"flops": 0.0, "wall_s": 0.0, "runs": 0})
        found["flops"] += run.data.metrics.get("cost/gflops", 0.0) * 1e9
        found["wall_s"] += ((run.info.end_time or 0) - run.info.start_time) / 1000
        found["runs"] += 1
    return cost


def _compare(
    args: Any,
    study: Any,
    task: str,
    weights: str,
    outcome: Any,
    cost: dict[str, float],
    root: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from scipy.stats import spearmanr

    from freezelab.advise_run import run_advise
    from freezelab.report.rows import group_rows
    from freezelab.stats import difference
    from freezelab.study_config import stage_config
    from freezelab.trainers.config import deep_merge

    # The study's verdict on this task: each policy at its chosen rate, over its seeds.
    groups = [g for g in group_rows(outcome.rows) if g["variant"] == task and g["best_of_policy"]]
    means = {g["policy"]: g for g in groups}
    best = max(groups, key=lambda g: g["score"])
    best_label = best["policy"]
    tied = [
        label
        for label, g in means.items()
        if g is best or difference(best["values"], g["values"]).settled is not True
    ]
    # advise on the study's fine-tuning config of this task, over the study's policies.
    stage = deep_merge(study.finetune, study.variants[task])
    config = stage_config(
        study, stage, f"advise-{task}", policy={"type": "full"}, model={"weights": weights}
    ).to_dict()
    folder = Path(root, f"advise-{task}")
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(config))
    sweep = {"name": f"advise-{task}", "base": "base.yaml", "space": {"policies": study.policies}}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    started = time.perf_counter()
    advice = run_advise(
        folder / "sweep.yaml",
        budget=args.budget,
        rates=list(study.select.grid["optimizer.lr"]),
    ).advice
    advise_s = time.perf_counter() - started
    pick = advice.recommended.policy.label()
    order = [r.policy.label() for r in advice.ranking]
    labels = sorted(means)
    spearman = spearmanr(
        [-order.index(label) for label in labels], [means[label]["score"] for label in labels]
    ).statistic
    row = {
        "task": task,
        "advise_pick": f"{pick} lr={advice.recommended.lr:g}",
        "study_best": best_label,
        "study_tied": " / ".join(tied),
        "pick_in_tied": pick in tied,
        "regret": best["score"] - means[pick]["score"],
        "spearman": float(spearman),
        "advise_tied": " / ".join(r.policy.label() for r in advice.tied),
        "flops_share": advice.spent_flops / cost["flops"],
        "planned_share": advice.plan.planned_flops / cost["flops"],
        "images_per_epoch": advice.plan.images_per_epoch,
        "advise_s": advise_s,
        "study_runs_s": cost["wall_s"],
        "time_share": advise_s / cost["wall_s"],
    }
    by_study = sorted(labels, key=lambda label: -means[label]["score"])
    table = [
        {
            "task": task,
            "policy": r.policy.label(),
            "advise_rank": i,
            "advise_lr": r.lr,
            "advise_val_acc": r.score,
            "advise_runs": len(r.values),
            "study_rank": by_study.index(r.policy.label()) + 1,
            "study_lr": means[r.policy.label()].get("selected") or "",
            "study_test_acc": means[r.policy.label()]["score"],
            "study_ci95_half": _half(means[r.policy.label()]),
        }
        for i, r in enumerate(advice.ranking, 1)
    ]
    return row, table


def _half(group: dict[str, Any]) -> float | None:
    if group["ci95_low"] is None:
        return None
    return (group["ci95_high"] - group["ci95_low"]) / 2


if __name__ == "__main__":
    main()
