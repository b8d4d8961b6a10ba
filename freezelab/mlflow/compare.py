"""``freezelab compare``: an experiment's runs side by side, from MLflow's search API.

>>> rows = compare_rows("freezelab", "sqlite:///mlflow.db")  # doctest: +SKIP
>>> print(format_rows(rows, "md"))                            # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

COLUMNS = (
    "policy",
    "best_val_acc",
    "val_acc",
    "epochs",
    "time_s",
    "trainable_pct",
    "status",
    "run_name",
    "run_id",
)


def compare_rows(
    experiment: str, tracking_uri: str, sort: str = "best_val_acc"
) -> list[dict[str, Any]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(
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
                "time_s": round((end - run.info.start_time) / 1000, 1) if end else None,
                "trainable_pct": round(100 * trainable / total, 2) if total else None,
                "status": run.info.status,
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
            }
        )
    key = sort if sort in COLUMNS else None
    if key is None and rows and not any(sort in r for r in rows):
        raise ValueError(f"cannot sort by {sort!r}; columns: {', '.join(COLUMNS)}")
    rows.sort(
        key=lambda r: (
            r.get(sort) is None,
            -(r.get(sort) or 0) if isinstance(r.get(sort), (int, float)) else str(r.get(sort)),
        )
    )
    return rows


def _policy_summary(params: dict[str, str]) -> str:
    kind = params.get("policy.type", "?")
    defaults = {"unit": "stage", "lr_decay": "1.0", "head_lr_mult": "1.0", "bn": "frozen"}
    extra = [
        f"{k.removeprefix('policy.')}={v}"
        for k, v in sorted(params.items())
        if k.startswith("policy.")
        and k != "policy.type"
        and v not in ("None", "()")
        and defaults.get(k.removeprefix("policy.")) != v
    ]
    return kind + (f"({', '.join(extra)})" if extra else "")


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [[_cell(r[c]) for c in COLUMNS] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
