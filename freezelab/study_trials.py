"""A study's fine-tuning runs as Ray Tune trials (``freezelab.sweep.trials``): which
config each trial trains, the row each finished run leaves for the study's tables, and
where a study keeps what lets it resume.

A study is named by its config (``study_tag``): the same study again continues where
it stopped, its finished runs kept. Each finished run writes its row (``study_row``)
into its own folder, so a resumed study reads the rows of runs that finished before
it was stopped instead of training them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from freezelab.report.runs import VARIANT_TAG
from freezelab.trainers.config import TrainConfig, validate_config
from freezelab.trainers.location import RunLocation

log = logging.getLogger(__name__)

ROW_FILE = "study_row.json"  # in each fine-tuning run's folder
STUDY_FILE = "study.json"  # in the study's folder, beside Tune's state
# What does not change what a study computes: its display name and how it is run.
NEUTRAL_KEYS = ("name", "max_concurrent", "register_best_as")


def study_tag(study: Any) -> str:
    """The study's name and a digest of what it computes: running the same study again
    continues it; any change to its runs starts another."""
    identity = study.model_dump(mode="json", exclude=set(NEUTRAL_KEYS))
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{study.name}-{digest}"


@dataclass(frozen=True)
class StudyTrials:
    """The trials of a study: Tune's entry ``{"name": RUN}`` picks one of the study's
    fine-tuning configs (``freezelab.sweep.trials.TrialSource``)."""

    configs: dict[str, dict[str, Any]]  # run name -> its config (``TrainConfig.to_dict``)
    varying: tuple[str, ...]  # the grid's keys with more than one value
    source: dict[str, str]  # the driver's user and command, for each run's tags

    def config_for(self, trial: dict[str, Any]) -> TrainConfig:
        config = validate_config(self.configs[trial["name"]], origin=f"run {trial['name']!r}")
        tags = {**self.source, **config.mlflow.tags}
        return config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tags": tags})})

    def swept(self, trial: dict[str, Any]) -> tuple[str, ...]:
        return self.varying

    def label(self, trial: dict[str, Any]) -> str:
        return self.configs[trial["name"]]["mlflow"].get("run_name") or trial["name"]

    def finished(self, config: TrainConfig, tracked: Any) -> None:
        where = RunLocation.of(config)
        if tracked.outcome.already_complete and where.read_file(ROW_FILE) is not None:
            return  # a run that finished before the study was stopped keeps its row
        where.write_file(ROW_FILE, json.dumps(study_row(config, tracked, self.varying)))


def fit_runs(
    runs: list[TrainConfig],
    name: str,
    storage_path: str,
    parent: str | None,
    *,
    group: str,
    kind: str,
    varying: tuple[str, ...] = (),
    max_concurrent: int | None = None,
    scheduler: Any = None,
    groups: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any]]]:
    """``runs`` as the Tune experiment ``name`` (continued when it exists), nested under
    MLflow run ``parent``: each run's row (None when it did not finish) and Tune's
    outcome of it (``trial_outcomes``), by run name. ``groups`` puts each run's group
    in its trial entry, for ``GroupedASHA``."""
    from ray import tune

    from freezelab.mlflow.tracking import source_tags
    from freezelab.sweep.trials import fit_trials, plan_trials, trial_outcomes

    plan = plan_trials(runs[0], max_concurrent, group)
    runs = [_overridden(c, plan.overrides) for c in runs]
    log.info(f"up to {plan.concurrent} at once, {plan.describe(runs[0].scaling.num_workers)}")
    entries = [{"name": c.name, **({"group": groups[c.name]} if groups else {})} for c in runs]
    grid = fit_trials(
        StudyTrials({c.name: c.to_dict() for c in runs}, varying, source_tags()),
        plan,
        {"trial": tune.grid_search(entries)},
        name=name,
        storage_path=storage_path,
        parent_run_id=parent,
        resume=tune.Tuner.can_restore(RunLocation(storage_path, name).directory),
        epochs=runs[0].epochs,
        count=len(runs),
        kind=kind,
        scheduler=scheduler,
    )
    outcomes = {t["trial"]["name"]: t for t in trial_outcomes(grid)}
    return {c.name: read_row(c) for c in runs}, outcomes


def _overridden(config: TrainConfig, overrides: tuple[str, ...]) -> TrainConfig:
    """``config`` with the trial plan's overrides (workers, their resources, threads)."""
    from freezelab.trainers.config import apply_override

    data = config.to_dict()
    for override in overrides:
        apply_override(data, override)
    return validate_config(data, origin=f"run {config.name!r}")


def read_row(config: TrainConfig) -> dict[str, Any] | None:
    """The row a finished fine-tuning run left, None when it did not finish."""
    text = RunLocation.of(config).read_file(ROW_FILE)
    return json.loads(text) if text is not None else None


def study_row(config: TrainConfig, tracked: Any, varying: tuple[str, ...]) -> dict[str, Any]:
    """A fine-tuning run as the study's tables (and ``group_rows``) read it."""
    from freezelab.report.consequences import history_from_epochs, run_measures
    from freezelab.report.runs import head_groups_of

    m = tracked.outcome.metrics
    total = m["trainable_params"] + m["frozen_params"]
    data = config.to_dict()
    setting = ", ".join(f"{key}={_lookup(data, key)}" for key in varying)
    policy = config.policy.label()
    variant = config.mlflow.tags.get(VARIANT_TAG, "")
    train_time = m.get("train_time_s", float("nan"))
    return {
        "policy": policy,
        "setting": setting,
        "setting_key": json.dumps([variant, config.policy.to_dict(), setting], sort_keys=True),
        "label": policy + (f" [{setting}]" if setting else ""),
        "seed": config.seed,
        "run_name": config.name,
        "run_id": tracked.run_id,
        "model_uri": tracked.model_uri,
        "status": "FINISHED",
        "epochs": len(tracked.outcome.history),
        # A diverged run (trainers/divergence.py) finished, but its numbers are no result.
        "diverged": bool(m.get("diverged", 0)),
        "diverged_reason": m.get("diverged_reason"),
        "val_acc": m["val_acc"],
        "best_val_acc": m["best_val_acc"],
        "train_time_s": train_time,
        "wall_time_s": tracked.wall_time_s,
        "images_per_s": m.get("train_images", 0) / train_time if train_time > 0 else float("nan"),
        "trainable_share": m["trainable_params"] / total,
        "backbone_drift": _mean_backbone_drift(m),
        "cka": None,
        "variant": variant,
        **run_measures(history_from_epochs(tracked.outcome.history), head_groups_of(config)),
    }


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _mean_backbone_drift(metrics: dict[str, Any]) -> float:
    values = [v for k, v in metrics.items() if k.startswith("drift/") and k != "drift/head"]
    return sum(values) / len(values) if values else 0.0
