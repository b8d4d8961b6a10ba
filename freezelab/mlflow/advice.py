"""An advice as an MLflow run (tag ``freezelab.stage=advise``): the signals per group as
metrics, each candidate's score, the recommended policy as a param, a tag and the
artifact ``recommended_policy.yaml``, and the whole advice as ``advice.json``.

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


def log_advice(config: Any, advice: Any, *, candidates_from: str = "default") -> tuple[str, str]:
    """Log ``advice`` (for ``config``'s model and data) as a finished run; returns its
    run id and experiment id. ``candidates_from`` says where the candidates came from
    (``default`` or the sweep file's name)."""
    import mlflow
    from mlflow.entities import Param

    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = experiment_id_for(client, config.mlflow.experiment)
    recommended = advice.recommended
    tags = {
        k: v
        for k, v in run_tags(config).items()
        if k not in ("freezelab.policy", "freezelab.run_name")
    }
    tags.update({STAGE_TAG: ADVISE, "freezelab.recommended": recommended.label()})
    run = client.create_run(experiment_id, run_name=f"advise {config.model.name}", tags=tags)
    run_id = run.info.run_id
    try:
        params = {
            k: v
            for k, v in run_params(config).items()
            if k != "policy" and not k.startswith("policy.")
        }
        params.update(
            {
                "recommended": recommended.label(),
                "candidates": candidates_from,
                "samples": str(advice.signals.samples),
                "gradient_batches": str(advice.signals.batches),
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
    log.info(
        f"MLflow: advice run {run_id} in experiment {config.mlflow.experiment!r} at {redact_uri(uri)}"
    )
    return run_id, experiment_id


def _metrics(advice: Any) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values: dict[str, float] = {}
    for group in advice.signals.groups:
        if group.logme is not None:
            values[f"logme/{group.name}"] = group.logme
            values[f"logme_fit/{group.name}"] = group.fit
        values[f"rel_grad_norm/{group.name}"] = group.rel_grad_norm
        values[f"grad_snr/{group.name}"] = group.grad_snr
        values[f"grad_norm/{group.name}"] = group.grad_norm
    values["head_to_backbone"] = advice.signals.head_to_backbone
    values["advise_time_s"] = advice.time_s
    for ranked in advice.ranking:
        values[f"score/{ranked.policy.slug()}"] = ranked.score
    return [
        Metric(k, float(v), now, 0) for k, v in values.items() if v == v and abs(v) != float("inf")
    ]
