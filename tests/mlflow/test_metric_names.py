"""A run's metrics in MLflow: sections by prefix, one cost family, and runs logged under
the names of earlier versions still read by ``report`` and ``compare``."""

from __future__ import annotations

import math

import mlflow
import pytest

from freezelab.mlflow.callback import epoch_metrics
from freezelab.mlflow.compare import compare_rows
from freezelab.report.runs import load_record
from freezelab.trainers.metric_names import RENAMED, mlflow_name

REPORT = {
    "epoch": 3,
    "phase": "all",
    "train_loss": 0.5,
    "train_acc": 0.8,
    "val_loss": 0.6,
    "val_acc": 0.75,
    "val_images": 90,
    "epoch_time_s": 2.5,
    "images_per_s": 400.0,
    "train_time_s": 8.0,
    "train_images": 2000,
    "train_images/rank0": 1000,
    "train_images/rank1": 1000,
    "train_flops": 3.0e12,
    "trainable_share": 0.5,
    "trainable_params": 10,
    "frozen_params": 10,
    "feature_cache": 0,
    "peak_memory_mb": 100.0,
    "replicas_in_sync": 1,
    "nodes": 1,
    "world_size": 2,
    "lr/stem": 0.01,
    "lr/head": 0.01,
    "drift/head": 0.3,
    "grad_norm/head": 1.0,
    "best_val_acc": 0.8,
    "diverged": 0,
    "source_probe_acc": 0.9,
    "forgetting": 0.05,
    "shifted/val_acc/invert": 0.4,
}


def test_an_epoch_is_logged_in_sections_with_one_cost_family():
    logged = {m.key: m.value for m in epoch_metrics(REPORT)}
    # Unprefixed: only what a run is judged by (MLflow's "Model metrics" section).
    assert {k for k in logged if "/" not in k} == {"train_loss", "train_acc", "val_loss", "val_acc"}
    assert logged["cost/train_s"] == 8.0 and logged["cost/gflops"] == pytest.approx(3000.0)
    # The run's rate so far (the summary's), not the epoch's own 400 images/s.
    assert logged["cost/images_per_s"] == 2000 / 8.0
    assert "images_per_s" not in logged and "epoch/images_per_s" not in logged
    assert logged["epoch/time_s"] == 2.5 and logged["epoch/best_val_acc"] == 0.8
    assert logged["run/train_images/rank1"] == 1000 and logged["forgetting/drop"] == 0.05
    assert logged["lr/all"] == 0.01 and "lr/stem" not in logged
    # Constants are tags; no loop key that MLflow renames is logged under its old name.
    assert not {"nodes", "world_size", "feature_cache", "run/replicas_in_sync"} & set(logged)
    assert not set(RENAMED) & set(logged)


def test_a_run_logged_under_the_earlier_names_still_reads(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("old")
    run = client.create_run(experiment, run_name="old", tags={})
    client.log_param(run.info.run_id, "policy", "last_n(n=2)")
    old = {
        "val_acc": 0.7,
        "train_time_s": 4.0,
        "wall_time_s": 9.0,
        "train_images": 100,
        "train_flops": 2.0e9,
        "trainable_params": 1,
        "frozen_params": 3,
        "best_val_acc": 0.75,
        "epoch": 1,
        "forgetting": 0.1,
        "val_acc/invert": 0.3,
    }
    for step in (0, 1):
        for key, value in old.items():
            client.log_metric(run.info.run_id, key, value, step=step)
    client.set_terminated(run.info.run_id)

    record = load_record(client, client.get_run(run.info.run_id), uri)
    assert record.train_time_s == 4.0 and record.images_per_s == 25.0
    assert record.trainable_share == 0.25
    assert record.last(mlflow_name("train_flops")) == pytest.approx(2.0)  # GFLOPs
    assert record.last("shifted/val_acc/invert") == 0.3
    assert record.last(mlflow_name("forgetting")) == 0.1
    assert record.policy == "last_n(n=2)"

    (row,) = compare_rows("old", uri)
    assert (row["train_time_s"], row["wall_time_s"], row["epochs"]) == (4.0, 9.0, 2)
    assert row["best_val_acc"] == 0.75 and row["policy"] == "last_n(n=2)"
    assert not math.isnan(row["trainable_pct"])


def test_a_run_resumed_across_the_rename_keeps_each_epoch_once(tmp_path):
    from freezelab.mlflow.callback import log_epoch, logged_epochs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("resumed"), run_name="resumed")
    run_id = run.info.run_id
    for epoch in (0, 1):  # logged by an earlier version: the old names, "epoch" as the mark
        for key, value in (("val_acc", 0.5 + epoch / 10), ("train_time_s", 2.0 + epoch)):
            client.log_metric(run_id, key, value, step=epoch)
        client.log_metric(run_id, "epoch", epoch, step=epoch)
    assert logged_epochs(client, run_id) == {0, 1}  # not written again on resume or sync
    log_epoch(client, run_id, {"epoch": 2, "val_acc": 0.7, "train_time_s": 4.0})
    assert logged_epochs(client, run_id) == {0, 1, 2}

    record = load_record(client, client.get_run(run_id), uri)
    assert record.series("cost/train_s") == [(0, 2.0), (1, 3.0), (2, 4.0)]
    assert record.train_time_s == 4.0


def _run_with_a_model(tmp_path):
    """A run whose metrics go past epoch 1, and a (bare) logged model of it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("linked")
    run_id = client.create_run(experiment, run_name="linked").info.run_id
    for epoch in range(3):
        client.log_metric(run_id, "val_acc", 0.5 + epoch / 10, step=epoch)
    for step in range(6):  # global optimizer steps
        client.log_metric(run_id, "early/grad_norm/head", 10.0 - step, step=step)
    model = client.create_logged_model(experiment, name="linked", source_run_id=run_id)
    return client, run_id, model.model_id


def test_a_model_of_an_earlier_epoch_gets_that_epochs_metrics_once(tmp_path):
    from freezelab.mlflow.models import link_final_metrics

    client, run_id, model_id = _run_with_a_model(tmp_path)
    # The checkpoint of epoch 1, 4 optimizer steps in: a trial stopped after epoch 2.
    for _ in range(2):  # linking again (a retried finish) changes nothing
        link_final_metrics(client, run_id, model_id, step=1, global_step=3)
    linked = {m.key: (m.value, m.step) for m in client.get_logged_model(model_id).metrics}
    assert linked == {"val_acc": (0.6, 1), "early/grad_norm/head": (7.0, 3)}
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]
    assert len(client.get_metric_history(run_id, "val_acc")) == 3  # linked, not logged again


def test_a_model_whose_logging_did_not_finish_is_not_reused(tmp_path):
    from freezelab.mlflow.models import logged_model_uri

    client, run_id, model_id = _run_with_a_model(tmp_path)
    client.set_logged_model_tags(model_id, {"freezelab.epoch": "2"})
    experiment = client.get_run(run_id).info.experiment_id
    assert logged_model_uri(client, experiment, run_id, 2) is None  # still PENDING
    client.finalize_logged_model(model_id, "READY")
    assert logged_model_uri(client, experiment, run_id, 2) == f"models:/{model_id}"


def test_a_model_is_not_logged_into_another_active_run(tmp_path):
    from freezelab.mlflow.models import ActiveRunError, log_checkpoint_model
    from freezelab.mlflow.tracking import tracking_uri_set

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking_uri_set(uri), mlflow.start_run() as mine:
        with pytest.raises(ActiveRunError, match=mine.info.run_id):
            log_checkpoint_model(uri, "0" * 32, config=None, checkpoint_dir="nowhere", step=0)
    assert mlflow.MlflowClient(uri).search_logged_models(experiment_ids=["0"]) == []
