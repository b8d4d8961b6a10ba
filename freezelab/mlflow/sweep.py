"""A sweep's parent run in MLflow: its trials are nested child runs
(``mlflow.parentRunId``), so the UI groups and compares them. The parent holds the
search space, the results table and the best config; the best model is registered
when the sweep asks.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from freezelab.mlflow.models import ready_models
from freezelab.mlflow.store import RUN_KEY_TAG, experiment_id_for, find_run_by_key
from freezelab.mlflow.tracking import STAGE_TAG, ensure_reachable, resolve_tracking_uri, run_tags
from freezelab.mlflow.verdict import register_winner
from freezelab.redact import redact_config, redact_text
from freezelab.trainers.location import RunLocation
from freezelab.trainers.metric_names import mlflow_name

log = logging.getLogger(__name__)


def start_group_run(base: Any, name: str, kind: str) -> tuple[str, bool]:
    """Open (or reopen) the parent run of a group of runs (a sweep, a study); returns
    its id and whether it already existed."""
    import mlflow

    uri = resolve_tracking_uri(base.mlflow.tracking_uri)
    ensure_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = experiment_id_for(client, base.mlflow.experiment)
    key = f"{RunLocation(base.storage_path, name).key}#{kind}"
    run_id = find_run_by_key(client, experiment_id, key)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {k: v for k, v in run_tags(base).items() if k != "freezelab.run_name"}
    # Reports and `freezelab compare` treat every group run alike: kind "sweep".
    tags.update(
        {RUN_KEY_TAG: key, "freezelab.kind": "sweep", "freezelab.group": kind, STAGE_TAG: kind}
    )
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    log.info(f"MLflow: {kind} run {run.info.run_id} in experiment {base.mlflow.experiment!r}")
    return run.info.run_id, False


def _safe_sweep(sweep: Any) -> dict[str, Any]:
    """The sweep as logged: the base config's secrets and env var overrides hidden."""
    data = sweep.model_dump(mode="json")
    data["base"] = redact_config(data["base"])
    data["overrides"] = [
        "scaling.env_vars=***" if o.startswith("scaling.env_vars=") else redact_text(o)
        for o in data["overrides"]
    ]
    return data


def start_sweep_run(sweep: Any, base: Any) -> str:
    import mlflow

    run_id, existed = start_group_run(base, sweep.name, "sweep")
    if existed:
        return run_id
    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(base.mlflow.tracking_uri))
    client.log_param(run_id, "sweep.algorithm", sweep.algorithm)
    client.log_param(run_id, "sweep.num_samples", sweep.num_samples)
    client.log_param(run_id, "sweep.metric", f"{sweep.metric} ({sweep.mode})")
    client.log_param(
        run_id, "sweep.asha", json.dumps(sweep.asha.model_dump() if sweep.asha else None)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "search_space.json"
        path.write_text(json.dumps(_safe_sweep(sweep), indent=2))
        client.log_artifact(run_id, str(path))
    return run_id


def finish_sweep_run(sweep: Any, base: Any, outcome: Any) -> None:
    import mlflow

    uri = resolve_tracking_uri(base.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = outcome.parent_run_id
    best = outcome.best_row
    if best is not None and best["metric"] is not None:
        client.log_metric(run_id, best_metric("", mlflow_name(sweep.metric)), float(best["metric"]))
    with tempfile.TemporaryDirectory() as tmp:
        best_config = {"policy": outcome.best_policy, "params": outcome.best_params}
        (Path(tmp) / "best_config.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False))
        (Path(tmp) / "results.json").write_text(json.dumps(outcome.rows, indent=2, default=str))
        client.log_artifact(run_id, str(Path(tmp) / "best_config.yaml"))
        client.log_artifact(run_id, str(Path(tmp) / "results.json"))
    for key, value in outcome.best_policy.items():
        client.set_tag(run_id, f"best.policy.{key}", str(value))
    if sweep.register_best_as and best is not None:
        model_uri = best_trial_model_uri(client, base, best["run_name"])
        if model_uri:
            _register_winner(sweep, base, outcome, uri, model_uri)
        else:
            log.warning(
                f"no logged model of trial {best['run_name']} to register as "
                f"{sweep.register_best_as}"
            )
    client.set_terminated(run_id)


def _register_winner(sweep: Any, base: Any, outcome: Any, uri: str, model_uri: str) -> None:
    """Register the best trial's model with the verdict of its setting against each
    other policy's best setting (``verdict.register_winner``)."""
    from freezelab.policies import from_dict

    best = outcome.best_row
    label = from_dict(best["policy"]).label()
    values = outcome.compared.get(label) or [best["metric"]]
    register_winner(
        uri,
        model_uri,
        sweep.register_best_as,
        base.mlflow.alias,
        chosen_by=f"sweep {sweep.name}",
        policy=label,
        setting=", ".join(f"{k}={v}" for k, v in sorted(outcome.best_params.items())),
        variant="",  # a sweep has one target
        metric=sweep.metric,
        values=values,
        others={k: v for k, v in outcome.compared.items() if k != label},
    )


def finish_study_run(
    base: Any,
    run_id: str,
    winners: dict[str, dict[str, Any]],
    description: str,
    details: str,
    rows: list[dict[str, Any]],
) -> None:
    """Close a study's parent run with what it found in each target variant
    (``winners``: the variant's winning setting, ``""`` for a study without variants):
    metrics ``best/<variant>/<metric>`` (its verdict metric, and val_acc and
    ``cost/train_s`` beside it), tags ``freezelab.best.<variant>.policy`` and
    ``.setting``; the ``description`` (the run page's), its whole text ``details`` as
    ``summary.md``, and every fine-tuning run's row as ``results.json``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(base.mlflow.tracking_uri))
    tags = {"mlflow.note.content": description}
    for variant, best in winners.items():
        metrics = {best["metric"]: best["score"], "val_acc": best["val_acc"]}
        metrics[mlflow_name("train_time_s")] = best.get("train_time_s")
        for name, value in metrics.items():
            if value is not None:
                client.log_metric(run_id, best_metric(variant, name), float(value))
        prefix = f"freezelab.best.{variant}." if variant else "freezelab.best."
        tags[prefix + "policy"] = best["policy"]
        tags[prefix + "setting"] = best["setting"] or "-"
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(json.dumps(rows, indent=2, default=str))
        (Path(tmp) / "summary.md").write_text(details)
        client.log_artifact(run_id, str(Path(tmp) / "results.json"))
        client.log_artifact(run_id, str(Path(tmp) / "summary.md"))
    client.set_terminated(run_id)


def best_metric(variant: str, metric: str) -> str:
    """The parent run's metric of a variant's winner: ``best/new-digits/test_acc``
    (``best/test_acc`` in a study without variants).

    >>> best_metric("new-digits", "test_acc"), best_metric("", "val_acc")
    ('best/new-digits/test_acc', 'best/val_acc')
    """
    return f"best/{variant}/{metric}" if variant else f"best/{metric}"


def fail_group_run(base: Any, run_id: str) -> None:
    """Close a sweep's (or a study's) parent run as FAILED: no trial finished."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(base.mlflow.tracking_uri))
    client.set_terminated(run_id, status="FAILED")


def close_stopped_run(config: Any, epochs: int, why: str) -> None:
    """Close the MLflow run of a trial that Tune stopped before its last epoch (and
    before it could close its run) as KILLED, saying why in ``freezelab.stopped``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(config.mlflow.tracking_uri))
    experiment_id = experiment_id_for(client, config.mlflow.experiment)
    run_id = find_run_by_key(client, experiment_id, RunLocation.of(config).mlflow_key())
    if run_id is None or client.get_run(run_id).info.status != "RUNNING":
        return
    client.set_tag(run_id, "freezelab.stopped", f"after epoch {epochs} of {config.epochs}: {why}")
    client.set_terminated(run_id, status="KILLED")


def best_trial_model_uri(client: Any, base: Any, run_name: str) -> str | None:
    experiment_id = experiment_id_for(client, base.mlflow.experiment)
    run_id = find_run_by_key(
        client, experiment_id, RunLocation(base.storage_path, run_name).mlflow_key()
    )
    if not run_id:
        return None
    # The client's search, not the fluent one: that reads the process's tracking URI,
    # which need not be the config's.
    models = ready_models(client, experiment_id, run_id)
    return models[0].model_uri if models else None


def child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=5000,
    )
