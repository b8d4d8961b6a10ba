"""``freezelab compare``: an experiment's runs side by side, from MLflow's search API.

>>> rows = compare_rows("freezelab", "sqlite:///mlflow.db")  # doctest: +SKIP
>>> print(format_rows(rows, "md"))                            # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any

from freezelab.console import Column, format_table
from freezelab.errors import NotFound
from freezelab.stats import summarize
from freezelab.trainers.location import RESULT_NEUTRAL
from freezelab.trainers.metric_names import current_metrics, mlflow_name

TABLE = (
    Column("policy", max_width=48),
    Column("val_acc", fmt="{:.4f}"),
    Column("best_val_acc", fmt="{:.4f}"),
    Column("epochs"),
    Column("train_time_s", fmt="{:.1f}"),
    Column("wall_time_s", fmt="{:.1f}"),
    Column("trainable_pct", fmt="{:.2f}"),
    Column("status"),
    Column("run_name"),
    Column("run_id"),
)
COLUMNS = tuple(c.key for c in TABLE)


# The accuracy of the model a run hands over (its last epoch), not its best epoch's.
DEFAULT_SORT = "val_acc"


def compare_rows(
    experiment: str, tracking_uri: str, sort: str = DEFAULT_SORT, *, with_pretraining: bool = False
) -> list[dict[str, Any]]:
    """The experiment's runs, pretraining runs (tag ``freezelab.stage=pretrain``) aside
    unless ``with_pretraining``."""
    from freezelab.mlflow.tracking import ADVISE, PRETRAIN, SELECT, STAGE_TAG, open_store

    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise NotFound(
            f"no MLflow experiment {experiment!r} at {tracking_uri}; experiments: {', '.join(names) or 'none'}"
        )
    rows, params_of = [], {}
    for run in client.search_runs([found.experiment_id], max_results=5000):
        # Under today's names, whichever names the run was logged under.
        metrics, params, tags = current_metrics(run.data.metrics), run.data.params, run.data.tags
        if tags.get("freezelab.kind") == "sweep":
            continue  # a sweep's parent run: its trials are the rows
        if tags.get(STAGE_TAG) == PRETRAIN and not with_pretraining:
            continue  # another task: its accuracy is not comparable
        if tags.get(STAGE_TAG) == SELECT:
            continue  # a study's selection run: it chose a learning rate
        if tags.get(STAGE_TAG) == ADVISE:
            continue  # `freezelab advise`: signals, nothing trained
        trainable = metrics.get(mlflow_name("trainable_params"))
        frozen = metrics.get(mlflow_name("frozen_params"))
        total = (trainable or 0) + (frozen or 0)
        end = run.info.end_time or run.info.start_time
        epoch = metrics.get(mlflow_name("epoch"))
        wall = metrics.get(mlflow_name("wall_time_s"))
        rows.append(
            {
                "policy": _policy_summary(params),
                "best_val_acc": metrics.get(mlflow_name("best_val_acc")),
                "val_acc": metrics.get("val_acc"),
                "epochs": int(epoch) + 1 if epoch is not None else None,
                "train_time_s": metrics.get(mlflow_name("train_time_s")),
                # Runs from before the wall time was logged: MLflow's own duration.
                "wall_time_s": wall
                if wall is not None
                else ((end - run.info.start_time) / 1000 if end else None),
                "trainable_pct": round(100 * trainable / total, 2) if total else None,
                "status": run.info.status,
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
            }
        )
        params_of[run.info.run_id] = params
    key = sort if sort in COLUMNS else None
    if key is None and rows and not any(sort in r for r in rows):
        raise NotFound(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
    _add_group_stats(rows, params_of, sort)
    rows.sort(
        key=lambda r: (
            r.get(sort) is None,
            -(r.get(sort) or 0) if isinstance(r.get(sort), (int, float)) else str(r.get(sort)),
        )
    )
    return rows


def _policy_summary(params: dict[str, str]) -> str:
    """The run's policy label: the ``policy`` param, else (a run logged without it)
    rebuilt from the ``policy.*`` params."""
    from freezelab.policies import PolicyError, from_dict

    if "policy" in params:
        return params["policy"]
    fields = {k.removeprefix("policy."): v for k, v in params.items() if k.startswith("policy.")}
    if "type" not in fields:
        return "?"
    try:
        import yaml

        return from_dict({k: yaml.safe_load(v) for k, v in fields.items() if v != "None"}).label()
    except (PolicyError, yaml.YAMLError):
        return fields["type"]


# Params that never tell two settings apart: the repeat itself, and bookkeeping.
NOT_A_SETTING = ("seed", *RESULT_NEUTRAL)


def settings_of(params_of: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
    """Each run's setting: its policy's params and every other param that varies across
    the runs, the seed and result-neutral params aside. Returns, per run id, a key that
    tells settings apart and the label of the varying params (``"optimizer.lr=0.01"``,
    empty when nothing varies)."""
    varying = sorted(
        key
        for key in {k for params in params_of.values() for k in params}
        if key != "policy"  # the policy's label and its fields: the key below
        and not key.startswith("policy.")
        and not any(key == n or key.startswith(n + ".") for n in NOT_A_SETTING)
        and len({params.get(key) for params in params_of.values()}) > 1
    )
    settings = {}
    for run_id, params in params_of.items():
        label = ", ".join(f"{k}={params.get(k)}" for k in varying)
        # Keyed on the policy's label and whichever of its fields are params.
        policy = sorted((k, v) for k, v in params.items() if k.partition(".")[0] == "policy")
        settings[run_id] = (json.dumps([policy, label]), label)
    return settings


def _add_group_stats(rows: list[dict[str, Any]], params_of: dict[str, dict], metric: str) -> None:
    """Runs that differ only in their seed form a group: each row gets its group's
    label and n, mean, std and 95% interval of ``metric`` (Student t)."""
    settings = settings_of(params_of)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key, label = settings[row["run_id"]]
        row["group"] = row["policy"] + (f" [{label}]" if label else "")
        groups.setdefault(key, []).append(row)
    for members in groups.values():
        # Only finished runs are repeats of a result.
        values = [
            r[metric]
            for r in members
            if r["status"] == "FINISHED" and isinstance(r.get(metric), (int, float))
        ]
        stats = summarize(values).as_dict() if values else {"n": 0}
        for row in members:
            row.update({k: stats.get(k) for k in STAT_KEYS})


STAT_KEYS = ("n", "mean", "std", "ci95_low", "ci95_high")


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    columns = list(TABLE)
    if any((r.get("n") or 0) > 1 for r in rows):
        # Repeats: the group's mean and 95% interval beside each run.
        for row in rows:
            if row.get("ci95_low") is not None:
                half = (row["ci95_high"] - row["ci95_low"]) / 2
                row["mean_ci95"] = f"{row['mean']:.4f} ± {half:.4f}"
        columns[1:1] = [Column("n"), Column("mean_ci95", "mean ± ci95")]
        if fmt in ("json", "csv"):
            columns += [Column("group"), *(Column(k) for k in STAT_KEYS[1:])]
    return format_table(rows, columns, fmt)
