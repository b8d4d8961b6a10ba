"""A registered winner carries the verdict of its runs: separated from every other
policy, or tied with the policies it cannot be told apart from (tags, a description,
a warning on the console). Registered in a real sqlite store, without Ray."""

from __future__ import annotations

import mlflow
import pytest
import torch

from freezelab.mlflow.models import registry_client
from freezelab.mlflow.store import RUN_KEY_TAG, experiment_id_for
from freezelab.mlflow.tracking import tracking_uri_set
from freezelab.mlflow.verdict import verdict
from freezelab.trainers.location import RunLocation
from tests.conftest import TINY, merge

SEPARATED = {
    "full": [0.90, 0.91, 0.92],
    "head_only": [0.70, 0.71, 0.72],
    "bitfit": [0.60, 0.62, 0.61],
}
# full leads on its mean, but its spread holds bitfit; head_only trails beyond doubt.
TIED = {"full": [0.85, 0.95, 0.75], "bitfit": [0.80, 0.85, 0.75], "head_only": [0.50, 0.51, 0.52]}
SINGLE = {"full": [0.90], "head_only": [0.70]}


def test_the_verdict_names_what_the_runs_cannot_tell_apart():
    winner, *others = SEPARATED.items()
    found = verdict(winner[1], dict(others), "val_acc")
    assert found.separated and found.tied_with == ()
    assert "runner-up head_only: +0.2000, interval [" in found.reason
    winner, *others = TIED.items()
    found = verdict(winner[1], dict(others), "val_acc")
    assert not found.separated and found.tied_with == ("bitfit",)
    assert found.reason.startswith("Not told apart from bitfit by these runs")
    found = verdict(SINGLE["full"], {"head_only": SINGLE["head_only"]}, "val_acc")
    assert (found.separated, found.tied_with) == (False, ("head_only",))
    assert found.reason == "n=1: no interval, nothing separates it from head_only."
    assert verdict([0.9], {}, "val_acc").separated


@pytest.fixture
def store(tmp_path):
    """A sqlite store with an experiment: ``(uri, experiment_id)``."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, experiment_id_for(mlflow.MlflowClient(uri), "verdict")


def _logged_model(uri: str, experiment_id: str, tags: dict[str, str] | None = None) -> str:
    """A finished run with a tiny logged model: the model's URI."""
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id, tags=tags or {}).info.run_id
    with tracking_uri_set(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            torch.nn.Linear(2, 2),
            name="tiny",
            serialization_format="pickle",
            pip_requirements=["torch"],
        )
    client.set_terminated(run_id)
    return info.model_uri


def _version(uri: str, name: str):
    (version,) = registry_client(uri).search_model_versions(f"name = '{name}'")
    return version


def _study_rows(values: dict[str, list[float]], model_uri: str) -> list[dict]:
    """The study's rows (``study_trials.study_row``) of each policy's runs; the first
    policy's best run holds ``model_uri``."""
    rows = []
    for policy, accuracies in values.items():
        for seed, val_acc in enumerate(accuracies):
            rows.append(
                {
                    "policy": policy,
                    "setting": "",
                    "setting_key": policy,
                    "label": policy,
                    "variant": "new-digits",
                    "seed": seed,
                    "run_name": f"{policy}-s{seed}",
                    "run_id": f"{policy}-{seed}",
                    "model_uri": model_uri if val_acc == max(accuracies) else None,
                    "status": "FINISHED",
                    "val_acc": val_acc,
                    **dict.fromkeys(
                        ("best_val_acc", "train_time_s", "images_per_s", "trainable_share"), 1.0
                    ),
                    "backbone_drift": 0.0,
                    "cka": None,
                }
            )
    return rows


@pytest.mark.parametrize(
    "case, separated, tied_with",
    [("separated", "true", None), ("tied", "false", "bitfit"), ("single", "false", "head_only")],
)
def test_a_study_registers_its_winner_with_the_verdict(
    store, tiny_config, capsys, case, separated, tied_with
):
    from freezelab.report.rows import group_rows
    from freezelab.study import STUDY_TAG, _register_best

    uri, experiment_id = store
    values = {"separated": SEPARATED, "tied": TIED, "single": SINGLE}[case]
    base = tiny_config(
        mlflow={"enabled": True, "tracking_uri": uri, "tags": {STUDY_TAG: "demo-1234"}}
    )
    rows = _study_rows(values, _logged_model(uri, experiment_id))
    _register_best(base, rows, group_rows(rows), "best")
    version = _version(uri, "best")
    assert version.tags["freezelab.policy"] == "full"
    assert version.tags["freezelab.variant"] == "new-digits"
    assert version.tags["freezelab.separated"] == separated
    assert version.tags.get("freezelab.tied_with") == tied_with
    assert version.tags["freezelab.study"] == "demo-1234"
    assert version.tags["freezelab.chosen_by"] == "study demo-1234"
    assert version.tags["freezelab.verdict"].startswith("val_acc 0.")
    assert version.tags["freezelab.verdict"] in version.description
    assert version.description.startswith(
        "The winner of study demo-1234: policy full, variant new-digits, val_acc "
    )
    out = capsys.readouterr().out
    if case == "separated":
        assert "Separated from every other policy" in version.description
        assert "warning" not in out
    else:
        assert f"not told apart from {tied_with}" in version.description.lower() or (
            f"n=1: no interval, nothing separates it from {tied_with}." in version.description
        )
        (warning,) = [line for line in out.splitlines() if "warning:" in line]
        assert "best version 1 (full) is registered, but: " in warning
        assert tied_with in warning
    if case == "single":
        assert "val_acc 0.9000 (n=1, no interval). n=1: no interval" in version.description
    else:
        assert "(95% interval, n=3)" in version.description
    assert str(registry_client(uri).get_model_version_by_alias("best", "champion").version) == "1"


@pytest.mark.parametrize("case", ["separated", "tied"])
def test_a_sweep_registers_its_winner_with_the_verdict(store, tmp_path, capsys, case):
    from freezelab.mlflow.sweep import finish_sweep_run, start_sweep_run
    from freezelab.sweep.results import SweepOutcome, best_row, compared, trial_run_name
    from freezelab.sweep.space import SweepConfig

    uri, experiment_id = store
    values = {"separated": SEPARATED, "tied": TIED}[case]
    base_dict = merge(
        TINY,
        {
            "storage_path": str(tmp_path / "runs"),
            "mlflow": {"enabled": True, "tracking_uri": uri, "experiment": "verdict"},
        },
    )
    sweep = SweepConfig.model_validate(
        {
            "name": "sw",
            "base": base_dict,
            "space": {"policies": [{"type": p} for p in values]},
            "seeds": [0, 1, 2],
            "register_best_as": "sweep-best",
        }
    )
    base = sweep.trial_config({"type": "full"}, {}, "sw-base")
    rows = []
    for policy, metrics in values.items():
        for seed, metric in enumerate(metrics):
            choice = {"policy": {"type": policy}, "params": {"seed": seed}}
            rows.append({**choice, "metric": metric, "run_name": trial_run_name("sw", choice)})
    best = best_row(rows, sweep)
    key = RunLocation(base.storage_path, best["run_name"]).mlflow_key()
    _logged_model(uri, experiment_id, {RUN_KEY_TAG: key})
    parent = start_sweep_run(sweep, base)
    outcome = SweepOutcome(
        rows,
        best["policy"],
        {},
        str(tmp_path),
        parent,
        best_row=best,
        compared=compared(rows, sweep),
    )
    finish_sweep_run(sweep, base, outcome)
    version = _version(uri, "sweep-best")
    assert version.tags["freezelab.policy"] == "full"
    assert version.tags["freezelab.variant"] == "-"
    assert version.description.startswith(
        "The winner of sweep sw: policy full, variant -, val_acc 0.9100 ± "
        if case == "separated"
        else "The winner of sweep sw: policy full, variant -, val_acc 0.8500 ± "
    )
    out = capsys.readouterr().out
    if case == "separated":
        assert version.tags["freezelab.separated"] == "true"
        assert "freezelab.tied_with" not in version.tags
        assert "warning" not in out
    else:
        assert version.tags["freezelab.separated"] == "false"
        assert version.tags["freezelab.tied_with"] == "bitfit"
        assert "Not told apart from bitfit by these runs" in version.description
        assert "sweep-best version 1 (full) is registered, but: Not told apart" in out
