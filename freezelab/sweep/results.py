"""What a sweep found: a row per trial, the best setting (mean over its seeds), the
results table, and the files written beside Tune's state."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from freezelab import objectstore
from freezelab.console import Column, format_table
from freezelab.policies import from_dict
from freezelab.sweep.space import SweepConfig
from freezelab.sweep.trials import trial_outcomes


@dataclass(frozen=True)
class SweepOutcome:
    rows: list[dict[str, Any]]
    best_policy: dict[str, Any]
    best_params: dict[str, Any]
    directory: str
    parent_run_id: str | None
    failed: int = 0  # trials that ended with an error
    best_row: dict[str, Any] | None = None  # the best run of the best setting
    # The metric's values of the best setting, then of each other policy's best setting.
    compared: dict[str, list[float]] = field(default_factory=dict)


def trial_run_name(sweep_name: str, choice: dict[str, Any]) -> str:
    """Stable per trial config: a retried trial resumes its Train run."""
    digest = hashlib.sha1(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:10]
    return f"{sweep_name}-{choice['policy']['type']}-{digest}"


def choice_of(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial's policy and params, from its Tune entry."""
    return {"policy": dict(trial["policy"]), "params": dict(trial.get("params") or {})}


def result_rows(grid, sweep: SweepConfig, epochs: int) -> list[dict[str, Any]]:
    """A row per trial, the best first (by the metric's last reported value, the one of
    the model each trial hands over); trials without the metric last."""
    rows = []
    for trial in trial_outcomes(grid):
        choice = choice_of(trial["trial"])
        metrics = trial["metrics"]
        rows.append(
            {
                "policy": choice["policy"],
                "params": choice["params"],
                "metric": metrics.get(sweep.metric),
                "best_val_acc": metrics.get("best_val_acc"),
                "epochs": trial["epochs"],
                "stopped_early": trial["epochs"] < epochs and trial["error"] is None,
                "error": trial["error"],
                "time_s": trial["time_s"],
                "train_time_s": metrics.get("train_time_s"),
                "run_name": trial_run_name(sweep.name, choice),
            }
        )
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0)))
    return rows


def best_row(finished: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any]:
    """The best run of the best setting: settings (policy and params, the seed aside)
    are ranked on the mean of the metric over their seeds; without seeds, each trial is
    a setting of its own."""
    sign = 1 if sweep.mode == "max" else -1
    return max(_settings(finished, sweep)[0], key=lambda r: sign * r["metric"])


def compared(finished: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, list[float]]:
    """The metric's values (one per seed) of the best setting, then of each other
    policy's best setting, by policy label: what the registered winner is judged on."""
    values: dict[str, list[float]] = {}
    for rows in _settings(finished, sweep):
        values.setdefault(from_dict(rows[0]["policy"]).label(), [r["metric"] for r in rows])
    return values


def _settings(finished: list[dict[str, Any]], sweep: SweepConfig) -> list[list[dict[str, Any]]]:
    """The finished trials by setting, the best mean first."""
    sign = 1 if sweep.mode == "max" else -1
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in finished:
        params = {k: v for k, v in row["params"].items() if k != "seed"}
        settings.setdefault(json.dumps([row["policy"], params], sort_keys=True), []).append(row)
    return sorted(
        settings.values(), key=lambda rows: -sign * sum(r["metric"] for r in rows) / len(rows)
    )


def format_results(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    shown = [
        {
            **r,
            "label": from_dict(r["policy"]).label()
            + (" " + json.dumps(r["params"], separators=(",", ":")) if r["params"] else ""),
            "stopped_early": "yes" if r["stopped_early"] else "no",
            "error": (r["error"] or "")[:80] or None,
        }
        for r in rows
    ]
    columns = [
        Column("label", "policy", max_width=48),
        Column("metric", sweep.metric, fmt="{:.4f}"),
        Column("best_val_acc", "best_acc", fmt="{:.4f}"),
        Column("epochs"),
        Column("stopped_early", "early"),
        Column("time_s"),
    ]
    if any(r["error"] for r in rows):
        columns.append(Column("error"))
    return format_table(shown, columns)


def write_best(outcome: SweepOutcome) -> None:
    """The best policy and the results beside Tune's state: a local folder or a URI."""
    files = {
        "best_policy.json": json.dumps(outcome.best_policy, indent=2),
        "best_policy.yaml": yaml.safe_dump(outcome.best_policy, sort_keys=False),
        "results.json": json.dumps(outcome.rows, indent=2, default=str),
    }
    for name, text in files.items():
        objectstore.write_text(objectstore.join(outcome.directory, name), text)
