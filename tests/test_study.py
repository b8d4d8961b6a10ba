"""The transfer study behind `freezelab demo`, shrunk to seconds (local mode)."""

import math
from pathlib import Path

import mlflow
import pytest

from freezelab.errors import ConfigError
from freezelab.report.build import group_rows
from freezelab.study import finetune_configs, format_study, load_study, run_study

SMALL = [
    "base.model.name=test_resnet",
    "base.scaling.num_workers=0",
    "base.batch_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=2",
    "policies=[{type: full}, {type: head_only}]",
]


def test_study_pretrains_then_compares_policies_and_writes_a_report(tmp_path, capsys):
    rows = run_study(None, overrides=SMALL)
    out = capsys.readouterr().out
    assert [r["policy"] for r in rows] == ["full", "head_only"]
    head_only = rows[1]
    assert head_only["backbone_drift"] == 0.0 and head_only["trainable_share"] < 0.01
    assert rows[0]["backbone_drift"] > 0.0 and rows[0]["trainable_share"] == 1.0
    assert "transfer study" in out and "head_only" in out
    assert "no interval with a single run" in out
    reports = list(Path("freezelab_reports").glob("*/index.html"))
    assert len(reports) == 1
    assert "report of the study:" in out and reports[0].name in out
    assert "report: study &#x27;transfer-study-" in reports[0].read_text()
    assert Path("mlflow.db").is_file()


def test_study_repeats_seeds_over_a_grid_and_registers_the_best_run(tmp_path, capsys):
    rows = run_study(
        None,
        overrides=[
            *SMALL,
            "finetune.epochs=1",
            "seeds=[0, 1]",
            "grid={optimizer.lr: [0.001, 0.1]}",
            "register_best_as=study-best",
        ],
    )
    out = " ".join(capsys.readouterr().out.split())  # the summary is wrapped
    assert len(rows) == 2 * 2 * 2
    assert {(r["policy"], r["setting"], r["seed"]) for r in rows} == {
        (p, f"optimizer.lr={lr}", seed)
        for p in ("full", "head_only")
        for lr in (0.001, 0.1)
        for seed in (0, 1)
    }
    groups = group_rows(rows)
    assert len(groups) == 4 and all(g["n"] == 2 and g["ci95_low"] is not None for g in groups)
    # the same numbers in the terminal and in the registered model
    assert f"{groups[0]['label']} won: val_acc {groups[0]['val_acc']:.4f} ±" in out
    best = max((r for r in rows if r["run_id"] in groups[0]["run_ids"]), key=lambda r: r["val_acc"])
    # An absolute URI: MLflow caches its sqlite stores by URI, so a relative one would
    # reach the database of the first working directory that used it.
    uri = f"sqlite:///{Path.cwd()}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("study-best", "champion")
    assert version.run_id == best["run_id"]
    assert f"registered run {best['run_name']}" in out
    # each run's seed is the one its name says
    runs = {r["run_id"]: client.get_run(r["run_id"]) for r in rows}
    for row in rows:
        assert runs[row["run_id"]].data.params["seed"] == str(row["seed"])
        assert math.isclose(
            float(runs[row["run_id"]].data.params["optimizer.lr"]),
            float(row["setting"].split("=")[1]),
        )


def test_study_grid_and_seeds_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="seeds repeat"):
        load_study(None, [*SMALL, "seeds=[0, 0]"])
    with pytest.raises(ConfigError, match="the study sets seed itself"):
        load_study(None, [*SMALL, "grid={seed: [1, 2]}"])
    with pytest.raises(ConfigError, match="optimizer.lr"):
        finetune_configs(load_study(None, [*SMALL, "grid={optimizer.lr: [-1]}"]), "t")
    with pytest.raises(ConfigError, match="register_best_as needs mlflow.log_model"):
        finetune_configs(
            load_study(None, [*SMALL, "register_best_as=x", "base.mlflow.log_model=false"]), "t"
        )
    assert not Path("mlflow.db").exists() and not Path("freezelab_runs").exists()


def test_format_study_lists_each_run_and_each_setting():
    row = {
        "policy": "full",
        "setting": "",
        "setting_key": "full",
        "label": "full",
        "seed": 0,
        "run_name": "r",
        "run_id": "1",
        "status": "FINISHED",
        "val_acc": 0.5,
        "best_val_acc": 0.6,
        "train_time_s": 1.0,
        "wall_time_s": 3.0,
        "images_per_s": 10.0,
        "trainable_share": 1.0,
        "backbone_drift": 0.1,
        "cka": None,
    }
    text = format_study("t", [row], group_rows([row]))
    assert "full" in text and "0.600" in text and "full won: val_acc 0.5000 (n=1" in text
