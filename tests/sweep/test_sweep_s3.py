"""A sweep whose ``storage_path`` is on S3 (the moto endpoint): Tune's state, the trials'
checkpoints, ``best_policy.yaml`` and the report all land in the bucket, MLflow closes
each trial from its checkpoint there, and ``--resume`` restores the sweep from S3."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml
from object_store import list_keys

from freezelab import objectstore
from freezelab.mlflow.sweep import child_runs
from freezelab.sweep.run import run_sweep
from freezelab.sweep.space import SweepConfig, resolved_on_driver
from tests.conftest import TINY, merge

pytestmark = pytest.mark.ray


def test_a_sweep_on_s3_keeps_its_state_and_results_there_and_resumes(
    ray_session, tmp_path, s3_endpoint, s3_bucket
):
    from freezelab.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"s3://{s3_bucket}/runs"
    base = merge(
        TINY,
        {
            "storage_path": storage,
            "epochs": 1,
            # One CPU worker: each trial trains in its own process, with its
            # checkpoints uploaded to S3.
            "scaling": {"num_workers": 1},
            "mlflow": {"enabled": True, "tracking_uri": uri, "experiment": "s3-sweep"},
        },
    )
    sweep = resolved_on_driver(
        SweepConfig.model_validate(
            {
                "name": "on-s3",
                "base": base,
                "space": {"policies": [{"type": "head_only"}, {"type": "full"}]},
                "max_concurrent_trials": 2,
            }
        )
    )
    outcome = run_sweep(sweep)
    assert outcome.failed == 0, [r["error"] for r in outcome.rows]
    assert outcome.directory == f"{storage}/on-s3"
    assert all(r["epochs"] == 1 for r in outcome.rows)

    keys = list_keys(s3_endpoint, s3_bucket, "runs/")
    for name in ("best_policy.yaml", "best_policy.json", "results.json"):
        assert f"runs/on-s3/{name}" in keys, keys
    best = yaml.safe_load(objectstore.read_text(f"{storage}/on-s3/best_policy.yaml"))
    assert best == outcome.best_policy
    assert json.loads(objectstore.read_text(f"{storage}/on-s3/best_policy.json")) == best
    # Tune's experiment state, and each trial's Train run with its checkpoint.
    assert any(k.startswith("runs/on-s3/experiment_state") for k in keys), keys
    for row in outcome.rows:
        run = f"runs/{row['run_name']}/"
        assert f"{run}freezelab_run.json" in keys
        assert f"{run}local_checkpoints/checkpoint_epoch=000000/model.safetensors" in keys, run

    # Each trial's MLflow run was closed from its checkpoint on S3, with its model.
    children = child_runs(uri, "s3-sweep", outcome.parent_run_id)
    client = mlflow.MlflowClient(uri)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    for child in children:
        models = client.search_logged_models(
            experiment_ids=[child.info.experiment_id],
            filter_string=f"source_run_id = '{child.info.run_id}'",
        )
        assert len(models) == 1, child.info.run_name

    # --resume restores Tune's state from S3 and reruns nothing.
    again = run_sweep(sweep, resume=True)
    assert again.best_policy == outcome.best_policy
    assert {c.info.run_id for c in child_runs(uri, "s3-sweep", outcome.parent_run_id)} == {
        c.info.run_id for c in children
    }

    # The report, written to the bucket (its CKA reads the checkpoints from S3).
    report = build_report(
        outcome.parent_run_id,
        out_dir=f"s3://{s3_bucket}/reports/on-s3",
        tracking_uri=uri,
        cka_samples=16,
    )
    assert report.location == f"s3://{s3_bucket}/reports/on-s3/index.html"
    reports = list_keys(s3_endpoint, s3_bucket, "reports/on-s3/")
    assert {"reports/on-s3/index.html", "reports/on-s3/report.json"} <= set(reports)
    assert all(row["cka"] is not None for row in report.rows), report.notes
