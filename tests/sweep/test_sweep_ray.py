"""Real sweeps on the shared 2-CPU Ray session: grid, ASHA, MLflow nesting, resume."""

import json

import mlflow
import pytest

from freezelab.mlflow.sweep import child_runs
from freezelab.sweep.run import run_sweep
from freezelab.sweep.space import SweepConfig, resolved_on_driver
from tests.conftest import TINY, merge

pytestmark = pytest.mark.ray


def _sweep(tmp_path, **update):
    base = merge(
        TINY,
        {
            "storage_path": str(tmp_path / "runs"),
            "epochs": 3,
            "data": {"classes": [5, 6, 7, 8, 9]},
            "mlflow": {
                "enabled": True,
                "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                "experiment": "sweeps",
            },
        },
    )
    return resolved_on_driver(SweepConfig.model_validate({"name": "grid", "base": base, **update}))


def test_grid_sweep_with_asha_and_nested_mlflow_runs(ray_session, tmp_path):
    # One trial at a time, the strong policy first: ASHA must stop the weak ones at
    # their first rung (their val_acc is below the median of what it has seen).
    sweep = _sweep(
        tmp_path,
        space={
            "policies": [
                {"type": "full"},
                {"type": "head_only"},
                {"type": "last_n", "n": {"choice": [1, 2]}},
            ]
        },
        asha={"grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=1,
    )
    outcome = run_sweep(sweep)
    assert len(outcome.rows) == 4
    assert outcome.best_policy == {"type": "full"}
    assert any(r["stopped_early"] for r in outcome.rows)
    full = next(r for r in outcome.rows if r["policy"] == {"type": "full"})
    assert full["epochs"] == 3 and not full["stopped_early"]
    assert json.loads((tmp_path / "runs" / "grid" / "best_policy.json").read_text()) == {
        "type": "full"
    }

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    children = child_runs(uri, "sweeps", outcome.parent_run_id)
    assert sorted(c.data.params["policy.type"] for c in children) == [
        "full",
        "head_only",
        "last_n",
        "last_n",
    ]
    parent = mlflow.MlflowClient(uri).get_run(outcome.parent_run_id)
    assert parent.data.tags["freezelab.kind"] == "sweep"
    assert parent.data.tags["best.policy.type"] == "full"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(outcome.parent_run_id)}
    assert {"search_space.json", "best_config.yaml", "results.json"} <= artifacts

    # Resuming a finished sweep reruns nothing: no Train run gains an epoch or a run.
    epochs_before = {
        c.info.run_id: len(mlflow.MlflowClient(uri).get_metric_history(c.info.run_id, "epoch"))
        for c in children
    }
    again = run_sweep(sweep, resume=True)
    assert again.best_policy == {"type": "full"}
    after = child_runs(uri, "sweeps", outcome.parent_run_id)
    assert {c.info.run_id for c in after} == set(epochs_before)
    for run_id, count in epochs_before.items():
        assert len(mlflow.MlflowClient(uri).get_metric_history(run_id, "epoch")) == count


def test_an_existing_sweep_needs_resume(ray_session, tmp_path):
    from freezelab.trainers.config import ConfigError

    sweep = _sweep(tmp_path, name="nothing", space={"policies": [{"type": "full"}]})
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(sweep, resume=True)
