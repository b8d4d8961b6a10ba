"""The report's rows: a run's row (``table_row``), and the settings grouped from
them (``group_rows``) with the statistics that the summary, the figures and the page
all read.

>>> rows = [table_row(record, None, "CKA not computed") for record in records]  # doctest: +SKIP
>>> groups = group_rows(rows)  # doctest: +SKIP
>>> [g["label"] for g in by_variant(groups)[""]]  # doctest: +SKIP
['full', 'head_only']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from freezelab.report.consequences import group_measures, run_measures
from freezelab.report.runs import RunRecord
from freezelab.stats import summarize as stats_summary

# Means over a setting's runs of these run columns.
AVERAGED = (
    "best_val_acc",
    "train_time_s",
    "images_per_s",
    "trainable_share",
    "backbone_drift",
    "cka",
)


def table_row(
    record: RunRecord, cka: float | None, cka_source: str, setting: tuple[str, str] = ("", "")
) -> dict[str, Any]:
    """The report's table row of a run: every number is read from its MLflow metrics.
    ``setting`` is the run's (key, label) from ``settings_of``: runs that share it are
    repeats of one setting (they differ in their seed only)."""
    key, label = setting
    return {
        "policy": record.policy,
        "setting": label,
        "setting_key": key or record.policy,
        "label": record.policy + (f" [{label}]" if label else ""),
        "variant": record.variant,
        "started": record.start_time,
        "run_name": record.run_name,
        "run_id": record.run_id,
        "seed": record.params.get("seed"),
        "status": record.status,
        "val_acc": record.val_acc,
        "test_acc": record.test_acc,
        "diverged": record.diverged_reason is not None,
        "diverged_reason": record.diverged_reason,
        "selected": record.selected,
        "best_val_acc": record.best_val_acc,
        "epochs_to_best": record.epochs_to_best,
        "epochs": record.epochs,
        "train_time_s": record.train_time_s,
        "images_per_s": record.images_per_s,
        "trainable_share": record.trainable_share,
        "backbone_drift": record.backbone_drift,
        "cka": cka,
        "cka_source": cka_source,
        **run_measures(record.history, record.head_groups),
    }


def verdict_metric(rows: list[dict[str, Any]]) -> str:
    """What the verdict ranks on: ``test_acc`` (the held-out test split, which no choice
    reads) when every run has it, else ``val_acc``."""
    measured = [r for r in rows if r.get("status", "FINISHED") == "FINISHED"] or rows
    has_test = all(not math.isnan(number_or(r.get("test_acc"), math.nan)) for r in measured)
    return "test_acc" if measured and has_test else "val_acc"


def group_rows(
    rows: list[dict[str, Any]], notes: list[str] | None = None, metric: str | None = None
) -> list[dict[str, Any]]:
    """One row per setting (a policy and the values of the other params that vary):
    n, mean (``score``), std and 95% interval of the verdict ``metric`` (default
    ``verdict_metric``) over its finished runs that did not diverge, the mean val_acc,
    and the means of the other columns; best verdict first. ``best_of_policy`` marks
    each policy's setting with the best mean val_acc (chosen on val, never on test):
    the one the summary compares. Diverged runs are left out, and named in ``notes``."""
    finished = [r for r in rows if r["status"] == "FINISHED"]
    healthy = [r for r in finished if not r.get("diverged")]
    counted = healthy or finished or rows
    metric = metric or verdict_metric(counted)
    if notes is not None:
        if finished and len(finished) < len(rows):
            notes.append(
                "left out of the settings' statistics (not FINISHED): "
                + ", ".join(f"{r['run_name']} ({r['status']})" for r in rows if r not in finished)
            )
        elif not finished:
            notes.append("no run has FINISHED: the statistics use the runs as they stand")
        diverged = [r for r in finished if r.get("diverged")]
        if diverged and healthy:
            notes.append(
                "left out of the ranking and the consequences (diverged): "
                + "; ".join(f"{r['run_name']} ({r.get('diverged_reason')})" for r in diverged)
            )
        elif diverged:
            notes.append("every finished run diverged: the statistics use them as they stand")
    members: dict[str, list[dict[str, Any]]] = {}
    # Variants in the order their runs started (the order of `rows` without start times).
    first_row: dict[str, float] = {}
    for index, row in enumerate(rows):
        variant, started = row.get("variant", ""), row.get("started") or index
        first_row[variant] = min(first_row.get(variant, math.inf), started)
    for row in counted:
        if not math.isnan(number_or(row.get(metric), math.nan)):
            members.setdefault(row["setting_key"], []).append(row)
    groups = []
    for runs in members.values():
        values = [r[metric] for r in runs]
        stats = stats_summary(values)
        group = {
            "variant": runs[0].get("variant", ""),
            "first_row": first_row[runs[0].get("variant", "")],
            "policy": runs[0]["policy"],
            "setting": runs[0]["setting"],
            "label": runs[0]["label"],
            "metric": metric,
            "values": values,
            "score": stats.mean,
            "val_acc": stats_summary([r["val_acc"] for r in runs]).mean,
            "std": stats.std,
            "n": stats.n,
            "ci95_low": stats.ci95_low,
            "ci95_high": stats.ci95_high,
            "run_ids": [r["run_id"] for r in runs],
        }
        for key in AVERAGED:
            measured = [r[key] for r in runs if not math.isnan(number_or(r[key], math.nan))]
            group[key] = sum(measured) / len(measured) if measured else None
        group[metric] = stats.mean
        group["selected"] = runs[0].get("selected")
        group_measures(group, runs, metric)
        group["ci95"][metric] = (
            None if stats.ci95_low is None else (stats.ci95_low, stats.ci95_high)
        )
        groups.append(group)
    # A target variant is another task, not a setting to choose: each policy's best
    # setting is chosen within each variant, on val_acc.
    seen = set()
    for group in sorted(groups, key=lambda g: (-g["val_acc"], number_or(g["train_time_s"]))):
        key = (group["variant"], group["policy"])
        group["best_of_policy"] = key not in seen
        seen.add(key)
        group["settings_of_policy"] = sum((g["variant"], g["policy"]) == key for g in groups)
    groups.sort(key=lambda g: (-g["score"], number_or(g["train_time_s"])))
    return groups


def diverged_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished runs flagged diverged (``group_rows`` leaves them out)."""
    return [r for r in rows if r["status"] == "FINISHED" and r.get("diverged")]


def by_variant(groups: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The settings of each target variant, best first, the variants in the order of
    their runs (a study's order: from the target closest to the source)."""
    variants: dict[str, list[dict[str, Any]]] = {}
    for group in sorted(groups, key=lambda g: g["first_row"]):
        variants.setdefault(group["variant"], [])
    for group in groups:
        variants[group["variant"]].append(group)
    return variants


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats on both (lower
    cost, higher accuracy), cheapest first. Points with a NaN are never on it.

    >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.5)])
    [3, 1]
    """
    valid = [i for i, (c, a) in enumerate(points) if not (math.isnan(c) or math.isnan(a))]
    front, best = [], -math.inf
    for i in sorted(valid, key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def time_and_accuracy(groups: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The (training time, verdict metric) point of each setting, as ``pareto_front``
    reads it: an unknown time costs most, an unknown accuracy is NaN."""
    return [(number_or(g["train_time_s"]), number_or(g["score"], math.nan)) for g in groups]


def number_or(value: Any, missing: float = math.inf) -> float:
    """``value`` as a float, or ``missing`` for a value not measured (None or NaN):
    the default sorts an unknown cost last."""
    return missing if value is None or math.isnan(value) else float(value)
