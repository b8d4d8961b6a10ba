"""Run a sweep on Ray Tune: the sweep's orchestration. Its trials run through the trial
machinery that studies share (``trials.py``); ``search.py`` chooses them and
``results.py`` ranks them.

>>> from freezelab.sweep.space import load_sweep
>>> outcome = run_sweep(load_sweep("examples/sweep_tiny.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import yaml

from freezelab.errors import ConfigError, FreezelabError
from freezelab.policies import from_dict
from freezelab.redact import redact_uri
from freezelab.sweep.results import (
    SweepOutcome,
    best_row,
    choice_of,
    compared,
    format_results,
    result_rows,
    trial_run_name,
    write_best,
)
from freezelab.sweep.search import search_for
from freezelab.sweep.space import SweepConfig, validate_space
from freezelab.sweep.trials import fit_trials, plan_trials
from freezelab.trainers.launch import init_ray
from freezelab.trainers.location import RunLocation
from freezelab.trainers.preflight import check_storage

log = logging.getLogger(__name__)


class SweepFailed(FreezelabError):
    """Every trial of a sweep (or every fine-tuning run of a study) failed: there is no
    best policy."""

    exit_code = 1


def run_sweep(
    sweep: SweepConfig, *, resume: bool = False, address: str | None = None
) -> SweepOutcome:
    from ray import tune

    validate_space(sweep)  # every policy the space can produce, before any trial starts
    base = sweep.trial_config(sweep.space.extreme_policies()[0], {}, f"{sweep.name}-base")
    # A bucket that does not exist or cannot be written fails here, in one line.
    check_storage(base.storage_path)
    directory = RunLocation(base.storage_path, sweep.name).directory
    if resume and not tune.Tuner.can_restore(directory):
        raise ConfigError(f"sweep {sweep.name!r}: nothing to resume at {redact_uri(directory)}")
    if not resume and tune.Tuner.can_restore(directory):
        raise ConfigError(
            f"sweep {sweep.name!r} already exists at {redact_uri(directory)}: pass --resume to "
            "continue it, or choose another name"
        )
    init_ray(address)
    plan = plan_trials(base, sweep.max_concurrent_trials, f"sweep {sweep.name!r}")
    sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *plan.overrides]})
    parent = _start_parent(sweep, base)
    from freezelab.mlflow.tracking import source_tags

    param_space, search_alg, num_samples = search_for(sweep)
    scheduler = None
    if sweep.asha is not None and sweep.asha.within == "policy":
        from freezelab.sweep.schedulers import GroupedASHA, GroupOf

        scheduler = GroupedASHA(
            GroupOf("policy"),
            max_t=base.epochs,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    elif sweep.asha is not None:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=base.epochs,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    grid = param_space.get("trial", {})
    trials = (
        len(grid["grid_search"])
        if isinstance(grid, dict) and "grid_search" in grid
        else num_samples
    )
    log.info(
        f"sweep {sweep.name!r}: {sweep.algorithm}, {trials} trial(s), up to "
        f"{plan.concurrent} at once, {plan.describe(base.scaling.num_workers)}"
    )
    results = fit_trials(
        SweepTrials(sweep.model_dump(mode="json"), source_tags()),
        plan,
        param_space,
        name=sweep.name,
        storage_path=base.storage_path,
        parent_run_id=parent,
        resume=resume,
        epochs=base.epochs,
        count=trials,
        metric=sweep.metric,
        mode=sweep.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
    )
    rows = result_rows(results, sweep, base.epochs)
    print(format_results(rows, sweep))
    if parent is not None:
        _finish_stopped_trials(rows, sweep)
    # The best comes only from trials that finished with the metric; rows are sorted by
    # the last reported value, the one of the model each trial hands over.
    finished = [r for r in rows if r["error"] is None and r["metric"] is not None]
    failed = [r for r in rows if r["error"] is not None]
    if not finished:
        _fail_parent(base, parent)
        first = failed[0]["error"] if failed else f"no trial reported {sweep.metric!r}"
        raise SweepFailed(
            f"sweep {sweep.name!r}: none of its {len(rows)} trial(s) finished; no best policy "
            f"written. First error: {first}"
        )
    best = best_row(finished, sweep)
    best_params = {k: v for k, v in best["params"].items() if k != "seed"}
    outcome = SweepOutcome(
        rows,
        best["policy"],
        best_params,
        directory,
        parent,
        len(failed),
        best_row=best,
        compared=compared(finished, sweep),
    )
    write_best(outcome)
    _finish_parent(sweep, base, outcome)
    if failed:
        log.warning(
            f"{len(failed)} of {len(rows)} trial(s) failed (their errors above); "
            "the best policy comes from the trials that finished"
        )
    log.info(
        "best policy (paste as `policy:` into a train config), also in "
        f"{redact_uri(directory)}/best_policy.yaml:"
    )
    print(yaml.safe_dump({"policy": outcome.best_policy}, sort_keys=False).rstrip())
    return outcome


@dataclass(frozen=True)
class SweepTrials:
    """A sweep's trials: each Tune entry (a policy and params) is the sweep's base config
    with them applied (``freezelab.sweep.trials.TrialSource``)."""

    sweep_dict: dict[str, Any]
    source: dict[str, str]  # the driver's user and command, for each run's tags

    def config_for(self, trial: dict[str, Any]) -> Any:
        sweep = SweepConfig.model_validate(self.sweep_dict)
        return tracked_trial_config(sweep, choice_of(trial), self.source)

    def swept(self, trial: dict[str, Any]) -> tuple[str, ...]:
        return tuple(choice_of(trial)["params"])

    def label(self, trial: dict[str, Any]) -> str:
        return trial_label(choice_of(trial))

    def finished(self, config: Any, tracked: Any) -> None:
        pass


def _finish_stopped_trials(rows: list[dict[str, Any]], sweep: SweepConfig) -> None:
    """Close the MLflow runs of trials that Tune stopped (ASHA at a rung, or at max_t as
    the last epoch reports) before their own end could log the model and the status:
    from each trial's last checkpoint, as ``freezelab sync`` does. An early-stopped
    trial ends KILLED, with its model all the same."""
    from freezelab.mlflow.sync import finish_from_checkpoint

    for row in rows:
        if row["error"] is not None:
            continue
        config = tracked_trial_config(sweep, {"policy": row["policy"], "params": row["params"]})
        try:
            finish_from_checkpoint(
                config,
                status="KILLED" if row["stopped_early"] else "FINISHED",
                only_if_running=True,
            )
        except Exception as err:  # the sweep's results stand without this run's model
            log.warning(f"MLflow run of trial {row['run_name']} not closed: {err}")


def _fail_parent(base, parent_run_id: str | None) -> None:
    if parent_run_id is not None:
        from freezelab.mlflow.sweep import fail_group_run

        fail_group_run(base, parent_run_id)


def trial_label(choice: dict[str, Any]) -> str:
    """A trial's MLflow run name: its policy's label and its params' values, as in
    ``lp_ft(probe_epochs=3) lr=0.01``."""
    label = from_dict(choice["policy"]).label()
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(choice["params"].items()))
    return f"{label} {values}".strip()


def tracked_trial_config(
    sweep: SweepConfig, choice: dict[str, Any], source: dict[str, str] | None = None
) -> Any:
    """A trial's train config as tracked: its MLflow run named by its policy and params,
    tagged as a trial, with the driver's user and command (``source``: a trial's
    process is a Ray worker, which has none of its own)."""
    from freezelab.mlflow.tracking import STAGE_TAG

    config = sweep.trial_config(
        choice["policy"], choice["params"], trial_run_name(sweep.name, choice)
    )
    tags = {**(source or {}), **config.mlflow.tags, STAGE_TAG: "trial"}
    section = {"tags": tags, "run_name": config.mlflow.run_name or trial_label(choice)}
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update=section)})


def _start_parent(sweep: SweepConfig, base) -> str | None:
    if not base.mlflow.enabled:
        return None
    from freezelab.mlflow.sweep import start_sweep_run

    return start_sweep_run(sweep, base)


def _finish_parent(sweep: SweepConfig, base, outcome: SweepOutcome) -> None:
    if outcome.parent_run_id is None:
        return
    from freezelab.mlflow.sweep import finish_sweep_run

    finish_sweep_run(sweep, base, outcome)
