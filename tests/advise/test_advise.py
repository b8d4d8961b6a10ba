"""``freezelab advise`` end to end on a tiny model, with a real Ray session and MLflow
store: the budgeted search picks what a task with a known answer needs, holds its
budget (its runs' FLOPs as the loop counted them), says how sure it is, and logs its
runs under one MLflow run; bad input fails before anything is created."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from freezelab.cli import main
from freezelab.policies import from_dict
from freezelab.trainers.config import validate_config
from freezelab.trainers.models import build_for_config
from tests.conftest import TINY, merge

CANDIDATES = [{"type": "head_only"}, {"type": "last_n", "n": 1}, {"type": "full"}]


def _write(folder: Path, config: dict, candidates=CANDIDATES) -> Path:
    """A train config and a sweep over ``candidates`` on it: the sweep file's path."""
    (folder / "base.yaml").write_text(yaml.safe_dump(config))
    sweep = {"name": "advise", "base": "base.yaml", "space": {"policies": candidates}}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return folder / "sweep.yaml"


def _advise_json(path: Path, *args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["advise", str(path), "--format", "json", *args]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, ray_session) -> Path:
    """test_resnet trained on digits 0-2: its weights file (labels recorded)."""
    from freezelab.api import train

    folder = tmp_path_factory.mktemp("pretrained")
    config = validate_config(merge(TINY, {"epochs": 4, "storage_path": str(folder / "runs")}))
    return Path(train(config, progress=False).outcome.weights_file)


def _target(folder: Path, weights: Path, **data) -> dict:
    """The target run's config: the digits 0-2 again, 8 labels per class, from
    ``weights``, tracked in a sqlite store of its own."""
    return merge(
        TINY,
        {
            "epochs": 4,
            "model": {"weights": str(weights)},
            "data": {"train_per_class": 8, **data},
            "storage_path": str(folder / "runs"),
            "mlflow": {
                "enabled": True,
                "tracking_uri": f"sqlite:///{folder}/mlflow.db",
                "experiment": "advice",
            },
        },
    )


@pytest.fixture(scope="module")
def advised(tmp_path_factory, pretrained):
    """advise where the pretrained features already solve the task (the same digits,
    the same labels, few of them): (its JSON object, the base config, the store)."""
    folder = tmp_path_factory.mktemp("advise")
    config = _target(folder, pretrained)
    path = _write(folder, config)
    found = _advise_json(path, "--rates", "0.005,0.05", "--budget", "0.5", "--samples", "30")
    return found, config, config["mlflow"]["tracking_uri"]


@pytest.mark.ray
def test_where_the_features_already_solve_the_task_training_them_gains_nothing(advised):
    found, _, _ = advised
    ranking = {r["label"]: r for r in found["ranking"]}
    # The head alone, on features pretrained for these very labels, is as good as it
    # gets: it wins or the runs cannot tell it from the winner.
    assert "head_only" in found["tied_with_winner"], found["ranking"]
    assert ranking["head_only"]["val_acc"] >= 0.9


@pytest.mark.ray
def test_the_json_holds_the_ranking_with_intervals_the_budget_and_the_signals(advised):
    found, _, _ = advised
    ranking = found["ranking"]
    assert {r["label"] for r in ranking} == {"head_only", "last_n(n=1)", "full"}
    assert from_dict(found["recommended"]) == from_dict(ranking[0]["policy"])
    assert found["recommended_lr"] == ranking[0]["lr"] and ranking[0]["lr"] in (0.005, 0.05)
    for r in ranking:
        # Three candidates, three survivors: each ran once per rate, then 2 more seeds.
        assert r["stage"] == "confirmed" and r["runs"] == 3, r
        assert r["ci95_low"] <= r["val_acc"] <= r["ci95_high"]
        assert [t["lr"] for t in r["tried"]] == [0.005, 0.05]
    budget = found["budget"]
    assert 0 < budget["spent_flops"] <= budget["planned_flops"] <= 0.5 * budget["reference_flops"]
    # Half the FLOPs of a study: a share of the 24 training images per epoch.
    assert budget["train_images"] == 24 and budget["images_per_epoch"] < 24
    assert budget["epoch_fraction"] == budget["images_per_epoch"] / 24
    groups = {g["name"]: g for g in found["signals"]["groups"]}
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert isinstance(groups["layer4"]["logme"], float)


@pytest.mark.ray
def test_the_recommendation_pasted_into_the_config_is_valid(advised):
    found, config, _ = advised
    pasted = yaml.safe_load(
        yaml.safe_dump(
            {"policy": found["recommended"], "optimizer": {"lr": found["recommended_lr"]}}
        )
    )
    validated = validate_config(merge(config, pasted))
    assert validated.optimizer.lr == found["recommended_lr"]
    model = build_for_config(validated, with_weights=False)
    for epoch in range(validated.epochs):
        validated.policy.plan(model, epoch)


@pytest.mark.ray
def test_the_advice_is_an_mlflow_run_with_its_short_runs_nested_under_it(advised):
    found, _, uri = advised
    client = mlflow.MlflowClient(uri)
    run = client.get_run(found["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["freezelab.stage"] == "advise"
    assert run.data.params["recommended"] == from_dict(found["recommended"]).label()
    assert run.data.metrics["budget/spent_flops"] == pytest.approx(found["budget"]["spent_flops"])
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    # 3 candidates x 2 rates, then 3 survivors x 2 seeds; the stopped ones are KILLED.
    assert len(children) == 12
    assert {c.data.tags["freezelab.stage"] for c in children} == {"advise"}
    assert sum(c.data.metrics["cost/gflops"] * 1e9 for c in children) == pytest.approx(
        found["budget"]["spent_flops"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"advice.json", "recommended_policy.yaml", "advice.txt"} <= artifacts
    from freezelab.mlflow.compare import compare_rows

    assert compare_rows("advice", uri) == []  # compare lists trained runs, not advice


@pytest.mark.ray
def test_where_the_frozen_features_say_nothing_advise_trains_the_backbone(tmp_path, pretrained):
    # The last stage's output made constant (its BatchNorms output 1 and 0 whatever
    # the input): a head on frozen features sees the same vector for every image, and
    # only training that stage can tell the classes apart.
    weights = tmp_path / "blind.safetensors"
    with safe_open(str(pretrained), "pt") as source:
        tensors = {k: source.get_tensor(k) for k in source.keys()}
        metadata = source.metadata()
    for name in ("layer4.0.bn2", "layer4.0.downsample.2"):
        tensors[f"{name}.weight"].zero_()
        tensors[f"{name}.bias"].fill_(1.0 if name.endswith("bn2") else 0.0)
    save_file(tensors, str(weights), metadata=metadata)
    config = _target(tmp_path, weights, train_per_class=24)
    found = _advise_json(_write(tmp_path, config), "--rates", "0.01,0.05", "--budget", "0.5")
    ranking = {r["label"]: r for r in found["ranking"]}
    assert found["ranking"][0]["label"] != "head_only", found["ranking"]
    assert found["ranking"][-1]["label"] == "head_only"
    assert ranking["head_only"]["val_acc"] < 0.5  # chance is 1/3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--samples", "2"], "--samples 2: the data has 3 classes"),
        (["--samples", "1"], "--samples 1: at least 2 images"),
        (["--samples", "3"], "--samples 3: the signals need at least 4 images"),
        (["--budget", "0.001"], "--budget 0.001: the search cannot train one image per class"),
        (["--budget", "2"], "--budget 2: give a share"),
        (["--rates", "0.01,x"], "--rates: '0.01,x': give learning rates"),
        (["--rates", "0.01,0.01"], "--rates [0.01, 0.01]: rates repeat"),
        (["--set", "model.name=no_such_model"], "unknown model 'no_such_model'"),
        (["--set", "data.kind=image_folder", "--set", "data.root=/nowhere"], "data"),
    ],
)
def test_bad_input_fails_in_one_line_before_anything_is_created(tmp_path, capsys, args, needle):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = merge(
        TINY,
        {"storage_path": str(tmp_path / "runs"), "mlflow": {"enabled": True, "tracking_uri": uri}},
    )
    path = tmp_path / "train.yaml"
    if "data.kind=image_folder" in args:
        config["data"] = {"kind": "image_folder", "root": str(tmp_path / "nowhere")}
        args = []
    path.write_text(yaml.safe_dump(config))
    try:
        code = main(["advise", str(path), *args])
    except SystemExit as exit_:  # argparse's own errors exit from the parser
        code = exit_.code
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("freezelab advise: error: "), errors
    assert needle.split(":")[0] in errors[0] or needle in errors[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["advise", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
