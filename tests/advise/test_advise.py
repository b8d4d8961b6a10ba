"""``freezelab advise`` end to end on a tiny model: the JSON object with real values,
a recommendation that validates as a policy for the model, the MLflow run, a sweep's
candidates, and bad input that fails before anything is created."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from freezelab.cli import main
from freezelab.policies import from_dict
from freezelab.trainers.config import validate_config
from freezelab.trainers.models import build_for_config
from tests.conftest import TINY, merge


def _write(tmp_path: Path, name: str = "train.yaml", **update) -> Path:
    path = tmp_path / name
    config = merge(TINY, {"storage_path": str(tmp_path / "runs"), **update})
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    """One tracked advise run as JSON: (its object, the config file, the store's URI)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("advise")
    uri = f"sqlite:///{folder}/mlflow.db"
    path = _write(
        folder,
        epochs=4,
        mlflow={"enabled": True, "tracking_uri": uri, "experiment": "advice"},
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["advise", str(path), "--format", "json", "--samples", "60"]) == 0
    return json.loads(out.getvalue()), path, uri


def test_json_holds_the_recommendation_the_ranking_and_the_signals(advised):
    found, _, _ = advised
    ranking = found["ranking"]
    assert {"policy", "score", "reason", "trainable_share", "flops_per_step"} <= set(ranking[0])
    # The recommendation is the first of the ranking, with only its non-default fields.
    assert from_dict(found["recommended"]) == from_dict(ranking[0]["policy"])
    assert len(found["recommended"]) <= len(ranking[0]["policy"])
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    labels = [r["label"] for r in ranking]
    assert {"head_only", "full", "last_n(n=1)", "lp_ft(probe_epochs=1)"} <= set(labels)
    assert all(r["reason"] and 0 < r["trainable_share"] <= 1 for r in ranking)
    by_label = {r["label"]: r for r in ranking}
    assert by_label["head_only"]["flops_per_step"] < by_label["full"]["flops_per_step"]
    assert by_label["full"]["trainable_share"] == 1.0
    groups = {g["name"]: g for g in found["signals"]["groups"]}
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    for name in ("stem", "layer4"):
        assert isinstance(groups[name]["logme"], float) and 0 <= groups[name]["logme_fit"] <= 1
        assert groups[name]["rel_grad_norm"] > 0 and groups[name]["grad_snr"] >= 0
    assert groups["head"]["logme"] is None and groups["head"]["rel_grad_norm"] > 0
    assert found["signals"]["samples"] == 60 and found["signals"]["head_to_backbone"] > 0


def test_the_recommendation_pasted_into_the_config_is_a_valid_policy(advised):
    found, path, _ = advised
    config = yaml.safe_load(path.read_text())
    config["policy"] = found["recommended"]
    validated = validate_config(config)
    model = build_for_config(validated, with_weights=False)
    validated.policy.validate_epochs(validated.epochs)
    for epoch in range(validated.epochs):
        validated.policy.plan(model, epoch)


def test_the_advice_is_an_mlflow_run_tagged_advise(advised):
    found, _, uri = advised
    client = mlflow.MlflowClient(uri)
    run = client.get_run(found["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["freezelab.stage"] == "advise"
    recommended = from_dict(found["recommended"]).label()
    assert run.data.params["recommended"] == recommended
    assert run.data.metrics["logme/layer4"] == pytest.approx(
        next(g["logme"] for g in found["signals"]["groups"] if g["name"] == "layer4")
    )
    assert "rel_grad_norm/head" in run.data.metrics and "grad_snr/stem" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"advice.json", "recommended_policy.yaml", "advice.txt"} <= artifacts
    pasted = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/recommended_policy.yaml")
    assert yaml.safe_load(pasted) == {"policy": found["recommended"]}
    # `freezelab compare` lists trained runs only: an advice trained nothing.
    from freezelab.mlflow.compare import compare_rows

    assert compare_rows("advice", uri) == []


@pytest.mark.ray
def test_with_an_address_the_advice_is_measured_on_a_ray_worker(
    advised, ray_session, tmp_path, capsys
):
    import time

    from ray.util.state import list_tasks

    found, _, _ = advised
    address = ray_session.get_runtime_context().gcs_address
    path = _write(tmp_path, epochs=4)  # the fixture's config, without tracking
    args = ["advise", str(path), "--format", "json", "--samples", "60", "--address", address]
    assert main(args) == 0
    remote = json.loads(capsys.readouterr().out)
    # A Ray task of the cluster measured it, and measured what the driver does.
    deadline = time.monotonic() + 30
    while True:  # the state API hears of a task's end within a few seconds
        tasks = list_tasks(
            address=address, filters=[("func_or_class_name", "=", "_remote_advise")], detail=True
        )
        if [t.state for t in tasks] == ["FINISHED"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [t.state for t in tasks] == ["FINISHED"]
    assert from_dict(remote["recommended"]) == from_dict(found["recommended"])
    for ours, theirs in zip(found["signals"]["groups"], remote["signals"]["groups"], strict=True):
        assert ours["name"] == theirs["name"]
        assert theirs["rel_grad_norm"] == pytest.approx(ours["rel_grad_norm"], rel=1e-3)


def test_a_sweep_file_is_advised_over_its_own_candidates(tmp_path, capsys):
    base = _write(tmp_path, epochs=3)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "base": base.name,
                "space": {
                    "policies": [
                        {"type": "head_only"},
                        {"type": "last_n", "n": {"randint": [1, 2]}},
                    ]
                },
            }
        )
    )
    assert main(["advise", str(sweep), "--samples", "30"]) == 0
    out = capsys.readouterr().out
    table = out.split("candidate policies, best first:")[1].split("recommended")[0]
    assert {"head_only", "last_n(n=1)", "last_n(n=2)"} <= set(table.split())
    assert "full" not in table.split() and "policy:\n  type: " in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--samples", "2"], "--samples 2: the data has 3 classes"),
        (["--samples", "1"], "--samples 1: at least 2 images"),
        (["--set", "model.name=no_such_model"], "unknown model 'no_such_model'"),
        (["--set", "data.kind=image_folder", "--set", "data.root=/nowhere"], "data"),
    ],
)
def test_bad_input_fails_in_one_line_before_anything_is_created(tmp_path, capsys, args, needle):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _write(tmp_path, mlflow={"enabled": True, "tracking_uri": uri})
    if "data.kind=image_folder" in args:
        config = yaml.safe_load(path.read_text())
        config["data"] = {"kind": "image_folder", "root": str(tmp_path / "nowhere")}
        path.write_text(yaml.safe_dump(config))
        args = []
    assert main(["advise", str(path), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab advise: error: "), errors
    assert needle.split(":")[0] in errors[0] or needle in errors[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["advise", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
