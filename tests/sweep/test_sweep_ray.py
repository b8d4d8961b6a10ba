"""Real sweeps on the shared 2-CPU Ray session: grid, ASHA, MLflow nesting, resume."""

import json
import re

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


def test_grid_sweep_with_asha_and_nested_mlflow_runs(ray_session, tmp_path, capsys):
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
    # The console: one line per trial epoch, how each stopped trial ended, the count of
    # finished trials, and none of Tune's own tables (those come with -v).
    out = capsys.readouterr().out
    for epoch in (1, 2, 3):
        assert len(re.findall(rf"^\[freezelab\] full epoch {epoch}/3 phase", out, re.M)) == 1
    stopped = [r for r in outcome.rows if r["stopped_early"]]
    assert out.count(": stopped after 1 of 3 epoch(s)") == len(stopped)
    assert "[freezelab] trials finished: 4/4" in out
    assert "Trial status" not in out and "Configuration for experiment" not in out
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
    # Tune stops each trial as it reports (ASHA at a rung, or max_t at the last epoch)
    # before the trial's own end runs: the sweep closes those runs from their checkpoints.
    stopped = {r["run_name"]: r["stopped_early"] for r in outcome.rows}
    client = mlflow.MlflowClient(uri)
    # In the MLflow UI each trial is named by its policy, and tagged as a trial.
    assert sorted(c.info.run_name for c in children) == [
        "full",
        "head_only",
        "last_n(n=1)",
        "last_n(n=2)",
    ]
    for child in children:
        assert child.data.tags["freezelab.stage"] == "trial"
        expected = "KILLED" if stopped[child.data.tags["freezelab.run_name"]] else "FINISHED"
        assert child.info.status == expected, child.info.run_name
        models = client.search_logged_models(
            experiment_ids=[child.info.experiment_id],
            filter_string=f"source_run_id = '{child.info.run_id}'",
        )
        assert len(models) == 1, child.info.run_name
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "run/epoch")]
        assert epochs == list(range(len(epochs))) and len(epochs) >= 1
    parent = mlflow.MlflowClient(uri).get_run(outcome.parent_run_id)
    assert parent.data.tags["freezelab.kind"] == "sweep"
    assert parent.data.tags["best.policy.type"] == "full"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(outcome.parent_run_id)}
    assert {"search_space.json", "best_config.yaml", "results.json"} <= artifacts

    # Resuming a finished sweep reruns nothing: no Train run gains an epoch or a run.
    epochs_before = {
        c.info.run_id: len(mlflow.MlflowClient(uri).get_metric_history(c.info.run_id, "run/epoch"))
        for c in children
    }
    again = run_sweep(sweep, resume=True)
    assert again.best_policy == {"type": "full"}
    after = child_runs(uri, "sweeps", outcome.parent_run_id)
    assert {c.info.run_id for c in after} == set(epochs_before)
    for run_id, count in epochs_before.items():
        assert len(mlflow.MlflowClient(uri).get_metric_history(run_id, "run/epoch")) == count


def test_an_existing_sweep_needs_resume(ray_session, tmp_path):
    from freezelab.trainers.config import ConfigError

    sweep = _sweep(tmp_path, name="nothing", space={"policies": [{"type": "full"}]})
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(sweep, resume=True)


def _image_folder(root, broken: bool):
    """Two classes of 8x8 grey PNGs; with ``broken`` the files are not images at all
    (they pass every up-front check and fail in the first epoch)."""
    from PIL import Image

    for label, shade in (("a", 40), ("b", 200)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            path = root / label / f"{index}.png"
            if broken:
                path.write_bytes(b"not a png")
            else:
                Image.new("L", (8, 8), shade + index).save(path)
    return str(root)


def _folder_sweep(tmp_path, roots):
    base = merge(
        TINY,
        {
            "storage_path": str(tmp_path / "runs"),
            "epochs": 1,
            "mlflow": {
                "enabled": True,
                "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                "experiment": "failing",
            },
        },
    )
    base["data"] = {"kind": "image_folder", "root": roots[0], "input_size": 32, "val_fraction": 0.5}
    return resolved_on_driver(
        SweepConfig.model_validate(
            {
                "name": "failing",
                "base": base,
                "space": {
                    "policies": [{"type": "head_only"}],
                    "params": {"data.root": {"choice": roots}},
                },
                "max_concurrent_trials": 1,
            }
        )
    )


def test_a_sweep_whose_every_trial_fails_writes_no_best_and_fails(ray_session, tmp_path, capsys):
    from freezelab.sweep.run import SweepFailed

    sweep = _folder_sweep(tmp_path, [_image_folder(tmp_path / "broken", broken=True)])
    with pytest.raises(SweepFailed, match="none of its 1 trial"):
        run_sweep(sweep)
    assert not (tmp_path / "runs" / "failing" / "best_policy.yaml").exists()
    assert "cannot identify image file" in capsys.readouterr().out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("failing")
    parents = client.search_runs([experiment.experiment_id], "tags.`freezelab.kind` = 'sweep'")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert "best.policy.type" not in parents[0].data.tags


def test_a_sweep_with_some_failed_trials_says_so(ray_session, tmp_path):
    good = _image_folder(tmp_path / "good", broken=False)
    broken = _image_folder(tmp_path / "broken", broken=True)
    outcome = run_sweep(_folder_sweep(tmp_path, [good, broken]))
    assert outcome.failed == 1
    assert outcome.best_params == {"data.root": good}
    errors = [r for r in outcome.rows if r["error"]]
    assert len(errors) == 1 and errors[0]["params"] == {"data.root": broken}
    assert (tmp_path / "runs" / "failing" / "best_policy.yaml").exists()


def test_a_sweep_with_seeds_runs_each_setting_per_seed(ray_session, tmp_path):
    sweep = _sweep(
        tmp_path,
        name="seeded",
        space={"policies": [{"type": "head_only"}, {"type": "bitfit"}]},
        seeds=[0, 1],
        max_concurrent_trials=2,
        overrides=["epochs=1"],
        register_best_as="seeded-best",
    )
    outcome = run_sweep(sweep)
    assert outcome.failed == 0, [r["error"] for r in outcome.rows]
    assert sorted((r["policy"]["type"], r["params"]["seed"]) for r in outcome.rows) == [
        ("bitfit", 0),
        ("bitfit", 1),
        ("head_only", 0),
        ("head_only", 1),
    ]
    assert len({r["run_name"] for r in outcome.rows}) == 4  # one Train run per seed
    assert "seed" not in outcome.best_params
    means = {
        kind: sum(r["metric"] for r in outcome.rows if r["policy"]["type"] == kind) / 2
        for kind in ("head_only", "bitfit")
    }
    assert outcome.best_policy["type"] == max(means, key=means.get)
    # The winner is registered with the verdict of its two seeds against the other's.
    assert {k: sorted(v) for k, v in outcome.compared.items()} == {
        kind: sorted(r["metric"] for r in outcome.rows if r["policy"]["type"] == kind)
        for kind in ("head_only", "bitfit")
    }
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (version,) = mlflow.MlflowClient(uri, registry_uri=uri).search_model_versions(
        "name = 'seeded-best'"
    )
    assert version.tags["freezelab.policy"] == outcome.best_policy["type"]
    assert version.tags["freezelab.separated"] in ("true", "false")
    assert version.description.startswith(
        f"The winner of sweep seeded: policy {outcome.best_policy['type']}, variant -, val_acc "
    )


def test_trials_in_their_own_process_report_every_epoch_to_tune(ray_session, tmp_path, capsys):
    # MLflow off: nothing runs after a trial's last report, so a report still in flight
    # when the trial's function returns would be lost (the benchmark caught one).
    sweep = _sweep(
        tmp_path,
        name="every-epoch",
        space={"policies": [{"type": "head_only"}, {"type": "bitfit"}, {"type": "full"}]},
        overrides=["mlflow.enabled=false"],
    )
    outcome = run_sweep(sweep)
    assert "training in its own process" in capsys.readouterr().out
    assert [(r["epochs"], r["stopped_early"]) for r in outcome.rows] == [(3, False)] * 3
