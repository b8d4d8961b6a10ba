"""The transfer study behind `freezelab demo`, shrunk to seconds: the pretraining in
this process, the fine-tuning runs as Tune trials on the shared Ray session."""

import math
from pathlib import Path

import mlflow
import pytest
from small_study import SMALL_STUDY

from freezelab.errors import ConfigError
from freezelab.report.rows import group_rows
from freezelab.study import finetune_configs, format_study, load_study, run_study

SMALL = SMALL_STUDY


@pytest.mark.ray
def test_study_pretrains_then_compares_policies_on_each_variant_and_writes_a_report(
    small_study_run,
):
    # SMALL's study, run once for this test and the concurrency test (conftest.py)
    rows, out, folder = small_study_run.outcome.rows, small_study_run.out, small_study_run.folder
    # the built-in study's two target variants, each policy on each
    assert [(r["variant"], r["policy"]) for r in rows] == [
        ("new-digits", "full"),
        ("new-digits", "head_only"),
        ("new-digits-inverted", "full"),
        ("new-digits-inverted", "head_only"),
    ]
    head_only = rows[1]
    assert head_only["backbone_drift"] == 0.0 and head_only["trainable_share"] < 0.01
    assert rows[0]["backbone_drift"] > 0.0 and rows[0]["trainable_share"] == 1.0
    # the four consequences, measured on every run
    for row in rows:
        assert set(row["evaluations"]) == {
            "rotate:30",
            "gaussian_noise:0.3",
            "blur:1",
            "contrast:0.3",
        }
        assert row["train_flops"] > 0 and 0.0 <= row["source_probe_acc"] <= 1.0
    assert head_only["forgetting"] == 0.0 and math.isnan(head_only["backbone_grad_early"])
    assert rows[0]["backbone_grad_early"] > 0.0
    assert "fine-tuning on the target 'new-digits-inverted'" in out
    text = " ".join(out.split())  # the summary is wrapped
    assert "no interval with a single run" in text
    for opening in ("(1) Compute.", "(2) Data that differs", "(3) Forgetting", "(4) The new head"):
        assert opening in text
    assert "The gain of not freezing over freezing the backbone" in text
    reports = list((folder / "freezelab_reports").glob("*/index.html"))
    assert len(reports) == 1
    assert "report of the study:" in out and reports[0].name in out
    page = reports[0].read_text()
    assert "report: study &#x27;transfer-study-" in page
    assert "(4) The new head" in page and 'alt="forgetting"' in page
    # ... and in MLflow, where the report read them
    uri = f"sqlite:///{folder}/mlflow.db"
    logged = mlflow.MlflowClient(uri).get_run(rows[2]["run_id"]).data
    assert logged.tags["freezelab.variant"] == "new-digits-inverted"
    assert logged.metrics["shifted/val_acc/rotate:30"] == rows[2]["evaluations"]["rotate:30"]
    assert logged.metrics["forgetting/drop"] == rows[2]["forgetting"]
    assert {
        "forgetting/source_probe_acc",
        "forgetting/source_probe_acc_start",
        "early/grad_norm/layer1",
    } <= set(logged.metrics)
    # The study in the MLflow UI: every run nested under its parent, named by its policy,
    # the pretraining tagged as such; the parent says what won.
    client = mlflow.MlflowClient(uri)
    parent_id = client.get_run(rows[0]["run_id"]).data.tags["mlflow.parentRunId"]
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
    )
    names = sorted(run.info.run_name for run in children)
    assert names == sorted(
        [
            "pretrain",
            "full · new-digits",
            "head_only · new-digits",
            "full · inverted",
            "head_only · inverted",
        ]
    )
    labels = {run.data.tags.get("freezelab.label") for run in children}
    assert "head_only new-digits-inverted" in labels
    stages = {run.info.run_name: run.data.tags["freezelab.stage"] for run in children}
    assert stages.pop("pretrain") == "pretrain" and set(stages.values()) == {"finetune"}
    # Digits 5-9 are a new task for the model of digits 0-4: every fine-tuning run starts
    # from a fresh head, and says why.
    for run in children:
        if run.info.run_name != "pretrain":
            assert run.data.tags["freezelab.head_init"] == "reset"
            assert run.data.tags["freezelab.head_init.reason"] == (
                "labels differ: [5, 6, 7, 8, 9] vs [0, 1, 2, 3, 4]"
            )
    parent = client.get_run(parent_id)
    # The verdict is on the held-out test split: the parent names its best, and that
    # setting's val_acc beside it.
    best = max(r["test_acc"] for r in rows)
    winners = [r for r in rows if r["test_acc"] == best]
    # Each variant's winner: its metrics and tags, the table that opens its description.
    for variant in ("new-digits", "new-digits-inverted"):
        members = [r for r in rows if r["variant"] == variant]
        top = max(r["test_acc"] for r in members)
        tops = [r for r in members if r["test_acc"] == top]
        assert parent.data.metrics[f"best/{variant}/test_acc"] == top
        assert parent.data.metrics[f"best/{variant}/val_acc"] in {r["val_acc"] for r in tops}
        policy = parent.data.tags[f"freezelab.best.{variant}.policy"]
        assert policy in {r["policy"] for r in tops}
    assert "freezelab.variant" not in parent.data.tags
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**new-digits**: ")
    assert "| policy | test_acc | cost/train_s per run |" in description.splitlines()[2]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["freezelab.stage"] == "study"
    # the model the study hands over: registered, and a module its users can fine-tune
    registry = mlflow.MlflowClient(uri, registry_uri=uri)
    champion = registry.get_model_version_by_alias("transfer-study-best", "champion")
    assert champion.run_id in {r["run_id"] for r in winners}
    assert f"compare the runs in the MLflow UI: run `mlflow ui --backend-store-uri {uri}`" in out
    # ... on the study's own view of its runs (tests/mlflow/test_browser.py opens it)
    assert "?viewStateShareKey=freezelab-transfer-study-" in out
    assert "workflowType=machine_learning" in out
    # the pretraining is another task: compare leaves it out unless asked
    from freezelab.mlflow.compare import compare_rows

    assert len(compare_rows("freezelab", uri)) == 4
    assert len(compare_rows("freezelab", uri, with_pretraining=True)) == 5


@pytest.mark.ray
def test_study_repeats_seeds_over_a_grid_and_registers_the_best_run(ray_session, tmp_path, capsys):
    rows = run_study(
        None,
        overrides=[
            *SMALL,
            "finetune.epochs=1",
            "variants={}",
            "seeds=[0, 1]",
            "grid={optimizer.lr: [0.001, 0.1]}",
            "register_best_as=study-best",
        ],
    ).rows
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
    # the same numbers in the terminal and in the registered model: the winner is the
    # best on test_acc among each policy's setting chosen on val_acc, and its run with
    # the best val_acc is the one handed over
    winner = next(g for g in groups if g["best_of_policy"])
    assert winner["metric"] == "test_acc"
    assert f"{winner['label']} won: test_acc {winner['score']:.4f} ±" in out
    best = max((r for r in rows if r["run_id"] in winner["run_ids"]), key=lambda r: r["val_acc"])
    # An absolute URI: MLflow caches its sqlite stores by URI, so a relative one would
    # reach the database of the first working directory that used it.
    uri = f"sqlite:///{Path.cwd()}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("study-best", "champion")
    assert version.run_id == best["run_id"]
    assert f"registered run {best['run_name']}" in out
    # with the verdict of its setting against the other policy's best setting
    assert version.tags["freezelab.policy"] == winner["policy"]
    assert version.tags["freezelab.separated"] in ("true", "false")
    tag = client.get_run(best["run_id"]).data.tags["freezelab.study"]
    assert version.description.startswith(
        f"The winner of study {tag}: policy {winner['policy']} [{winner['setting']}]"
    )
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
    with pytest.raises(ConfigError, match="variant name 'a b': letters, digits"):
        load_study(None, [*SMALL, "variants={a b: {}}"])
    with pytest.raises(ConfigError, match="unknown shift 'flip'"):
        finetune_configs(load_study(None, [*SMALL, "variants={x: {data: {shift: flip}}}"]), "t")
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
