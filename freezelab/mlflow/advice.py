"""An advice as an MLflow run (tag ``freezelab.stage=advise``), its search runs nested
under it (tagged the same): each candidate's val_acc and interval (``candidate/...``),
the budget spent, the signals per group as metrics, the recommended policy and rate as params, a tag and
the artifact ``recommended_policy.yaml``, and the whole advice as ``advice.json``.

A train config's own run goes beside it in the same experiment; ``compare`` and
``report`` leave advice runs out (they trained nothing).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from freezelab.mlflow.store import experiment_id_for, log_datasets
from freezelab.mlflow.tracking import (
    ADVISE,
    STAGE_TAG,
    dataset_inputs,
    resolve_tracking_uri,
    run_params,
    run_tags,
)
from freezelab.redact import redact_uri

log = logging.getLogger(__name__)


def start_advice_run(config: Any) -> tuple[str, str]:
    """Open the advice's run before its search runs, which nest under it; returns its
    run id and experiment id."""
    import mlflow

    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = experiment_id_for(client, config.mlflow.experiment)
    tags = {k: v for k, v in run_tags(config).items() if k != "freezelab.run_name"}
    tags[STAGE_TAG] = ADVISE
    run = client.create_run(experiment_id, run_name=f"advise {config.model.name}", tags=tags)
    log.info(
        f"MLflow: advice run {run.info.run_id} in experiment {config.mlflow.experiment!r} at "
        f"{redact_uri(uri)}"
    )
    return run.info.run_id, experiment_id


def fail_advice_run(config: Any, run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(config.mlflow.tracking_uri))
    client.set_terminated(run_id, status="FAILED")


def finish_advice_run(
    config: Any, run_id: str, advice: Any, *, candidates_from: str = "default"
) -> None:
    """Log ``advice`` into its run and finish it: the recommendation as a param and a
    tag, the budget, each candidate's score and interval, the signals, and the artifacts
    ``advice.json``, ``advice.txt`` and ``recommended_policy.yaml``."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(config.mlflow.tracking_uri))
    recommended = advice.recommended
    try:
        client.set_tag(run_id, "freezelab.recommended", recommended.policy.label())
        params = {
            k: v
            for k, v in run_params(config).items()
            if k != "policy" and not k.startswith("policy.") and k != "optimizer.lr"
        }
        params.update(
            {
                "recommended": recommended.policy.label(),
                "recommended_lr": str(recommended.lr),
                "candidates": candidates_from,
                "budget": str(advice.plan.budget),
                "rates": ",".join(f"{r:g}" for r in advice.plan.rates),
                "epoch_fraction": f"{advice.plan.epoch_fraction:.4g}",
            }
        )
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        client.log_batch(run_id, metrics=_metrics(advice))
        log_datasets(client, run_id, dataset_inputs(config)[:1])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "advice.json").write_text(json.dumps(advice.to_dict(), indent=2))
            (folder / "recommended_policy.yaml").write_text(advice.recommended_yaml())
            (folder / "advice.txt").write_text(advice.format_text() + "\n")
            for name in ("advice.json", "recommended_policy.yaml", "advice.txt"):
                client.log_artifact(run_id, str(folder / name))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _metrics(advice: Any) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values: dict[str, float] = {
        "budget/spent_flops": advice.spent_flops,
        "budget/spent_share": advice.spent_flops / advice.plan.reference_flops,
        "budget/reference_flops": advice.plan.reference_flops,
        "advise_time_s": advice.time_s,
    }
    for ranked in advice.ranking:
        slug = ranked.policy.slug()
        values[f"candidate/val_acc/{slug}"] = ranked.score
        low, high = ranked.interval()
        if low is not None:
            values[f"candidate/val_acc_ci95_half/{slug}"] = (high - low) / 2
    if advice.signals is not None:
        for group in advice.signals.to_dict().get("groups", []):
            for key, value in group.items():
                if key not in ("name", "params", "is_head") and isinstance(value, int | float):
                    values[f"signals/{key}/{group['name']}"] = value
    return [
        Metric(k, float(v), now, 0)
        for k, v in values.items()
        if v is not None and v == v and abs(v) != float("inf")
    ]
