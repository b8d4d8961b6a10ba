"""``freezelab compare``: an experiment's runs side by side, from MLflow's search API.

>>> rows = compare_rows("freezelab", "sqlite:///mlflow.db")  # doctest: +SKIP
>>> print(format_rows(rows, "md"))                            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from freezelab.console import Column, format_table
from freezelab.errors import NotFound

TABLE = (
    Column("policy", max_width=48),
    Column("best_val_acc", fmt="{:.4f}"),
    Column("val_acc", fmt="{:.4f}"),
    Column("epochs"),
    Column("train_time_s", fmt="{:.1f}"),
    Column("wall_time_s", fmt="{:.1f}"),
    Column("trainable_pct", fmt="{:.2f}"),
    Column("status"),
    Column("run_name"),
    Column("run_id"),
)
COLUMNS = tuple(c.key for c in TABLE)


def compare_rows(
    experiment: str, tracking_uri: str, sort: str = "best_val_acc"
) -> list[dict[str, Any]]:
    from freezelab.mlflow.tracking import open_store

    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise NotFound(
            f"no MLflow experiment {experiment!r} at {tracking_uri}; experiments: {', '.join(names) or 'none'}"
        )
    rows = []
    for run in client.search_runs([found.experiment_id], max_results=5000):
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        if tags.get("freezelab.kind") == "sweep":
            continue  # a sweep's parent run: its trials are the rows
        trainable = metrics.get("trainable_params")
        frozen = metrics.get("frozen_params")
        total = (trainable or 0) + (frozen or 0)
        end = run.info.end_time or run.info.start_time
        rows.append(
            {
                "policy": _policy_summary(params),
                "best_val_acc": metrics.get("best_val_acc"),
                "val_acc": metrics.get("val_acc"),
                "epochs": int(metrics["epoch"]) + 1 if "epoch" in metrics else None,
                "train_time_s": metrics.get("train_time_s"),
                # Runs from before wall_time_s was logged: MLflow's own duration.
                "wall_time_s": metrics.get(
                    "wall_time_s", (end - run.info.start_time) / 1000 if end else None
                ),
                "trainable_pct": round(100 * trainable / total, 2) if total else None,
                "status": run.info.status,
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
            }
        )
    key = sort if sort in COLUMNS else None
    if key is None and rows and not any(sort in r for r in rows):
        raise NotFound(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
    rows.sort(
        key=lambda r: (
            r.get(sort) is None,
            -(r.get(sort) or 0) if isinstance(r.get(sort), (int, float)) else str(r.get(sort)),
        )
    )
    return rows


def _policy_summary(params: dict[str, str]) -> str:
    """The run's policy label: the ``policy`` param, else rebuilt from ``policy.*``."""
    from freezelab.policies import PolicyError, from_dict

    fields = {k.removeprefix("policy."): v for k, v in params.items() if k.startswith("policy.")}
    if "type" not in fields:
        return params.get("policy", "?")
    try:
        import yaml

        return from_dict({k: yaml.safe_load(v) for k, v in fields.items() if v != "None"}).label()
    except (PolicyError, yaml.YAMLError):
        return fields["type"]


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    return format_table(rows, TABLE, fmt)
