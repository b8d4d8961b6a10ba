"""MLflow tracking against a real sqlite store and a real ``mlflow server``."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from servers import Server

from freezelab.api import train
from freezelab.cli import main
from freezelab.mlflow.callback import MlflowMetricsCallback
from freezelab.mlflow.run import TrackedRun
from freezelab.mlflow.tracking import (
    TrackingUnavailable,
    flatten_params,
    head_init_tags,
    resolve_tracking_uri,
    tracking_uri_set,
)
from freezelab.trainers import checkpoint as ckpt
from freezelab.trainers.models import build_for_config


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _tracked(tiny_config, uri, **update):
    mlflow_section = {
        "enabled": True,
        "tracking_uri": uri,
        "experiment": "tests",
        **update.pop("mlflow", {}),
    }
    return tiny_config(mlflow=mlflow_section, **update)


def _run(client, run_id):
    return client.get_run(run_id)


def test_run_logs_params_metrics_artifacts_and_model(tiny_config, sqlite_uri):
    config = _tracked(
        tiny_config, sqlite_uri, name="tracked", epochs=3, policy={"type": "gradual", "every": 1}
    )
    tracked = train(config)
    outcome = tracked.outcome
    client = mlflow.MlflowClient(sqlite_uri)
    run = _run(client, tracked.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["policy.type"] == "gradual"
    assert run.data.params["optimizer.lr"] == "0.05"
    assert run.data.params["model.name"] == "test_resnet"
    # Only what a user filters or plots by: the whole config is config.yaml.
    # The policy once: its label and its type (a field only some policies have, such as
    # gradual's `every`, would be an axis most runs lack in the compare view).
    assert run.data.params["policy"] == "gradual(every=1)"
    assert run.data.params["policy.type"] == "gradual"
    assert not [k for k in run.data.params if k.startswith("policy.") and k != "policy.type"]
    assert "freezelab.policy" not in run.data.tags
    assert len(run.data.params) <= 20 and "name" not in run.data.params
    assert "None" not in run.data.params.values()
    assert not any(k.startswith(("checkpoint.", "storage_path")) for k in run.data.params)
    # MLflow's own surfaces: user, source, datasets with their context, experiment kind.
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    contexts = {
        n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()
    }
    assert contexts == {"digits[0,1,2]/train": "training", "digits[0,1,2]/val": "validation"}
    assert len({d.dataset.digest for d in inputs.values()}) == 2
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["freezelab.dataset"] == "digits"
    # What became of the classifier: no weights to start from, so a fresh one.
    assert run.data.params["model.head_init"] == "auto"
    assert run.data.tags["freezelab.head_init"] == "reset"
    assert run.data.tags["freezelab.head_init.reason"] == "no pretrained weights: a fresh model"
    for key in ("val_acc", "train_loss", "drift/head", "lr/all", "run/phase_index", "epoch/time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key
    # Sections a person can scan: without a prefix only what a run is judged by; one cost
    # family, whose rate is the run's (the summary's), not the last epoch's.
    metrics = run.data.metrics
    assert {k for k in metrics if "/" not in k} == {
        "val_acc",
        "val_loss",
        "train_acc",
        "train_loss",
    }
    assert metrics["cost/train_s"] == outcome.metrics["train_time_s"]
    assert metrics["cost/gflops"] == pytest.approx(outcome.metrics["train_flops"] / 1e9)
    assert metrics["cost/images_per_s"] == pytest.approx(
        outcome.metrics["train_images"] / outcome.metrics["train_time_s"]
    )
    assert metrics["cost/wall_s"] == tracked.wall_time_s
    assert metrics["epoch/best_val_acc"] == max(h["val_acc"] for h in outcome.history)
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.value for m in history] == [h["val_acc"] for h in outcome.history]
    # gradual(every=1) changes phase every epoch; every group has the same LR (one `lr/all`)
    phases = client.get_metric_history(run.info.run_id, "run/phase_index")
    assert [m.value for m in sorted(phases, key=lambda m: m.step)] == [0, 1, 2]
    assert [key for key in run.data.metrics if key.startswith("lr/")] == ["lr/all"]
    # health checks are tags, not charts of a constant
    assert run.data.tags["freezelab.replicas_in_sync"] == "1"
    assert "nodes" not in run.data.metrics and "feature_cache" not in run.data.metrics
    assert run.data.tags["freezelab.world_size"] == "1" and "world_size" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "policy.json", "phases"} <= artifacts
    phases = {a.path for a in client.list_artifacts(run.info.run_id, "phases")}
    assert {
        "phases/phase_epoch0000.json",
        "phases/phase_epoch0001.json",
        "phases/phases.txt",
    } <= phases
    policy = json.loads(open(client.download_artifacts(run.info.run_id, "policy.json")).read())
    assert policy == config.policy.to_dict()

    # The logged model's metrics are the run's final ones, early/* (at global steps) too:
    # those of the weights it holds.
    (logged,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    assert {m.key: m.value for m in logged.metrics} == run.data.metrics
    linked = {m.key: (m.value, m.step) for m in logged.metrics}
    assert linked["val_acc"] == (outcome.history[-1]["val_acc"], 2)
    assert [o.step for o in client.get_run(run.info.run_id).outputs.model_outputs] == [2]
    assert logged.tags["freezelab.policy"] == config.policy.label()

    # The logged model reloads and predicts exactly what the checkpoint's weights do.
    with tracking_uri_set(sqlite_uri):
        loaded = mlflow.pytorch.load_model(tracked.model_uri)
        pyfunc = mlflow.pyfunc.load_model(tracked.model_uri)
    reference = build_for_config(config)
    ckpt.load_model_weights(outcome.checkpoint_dir, reference)
    x = torch.randn(4, 3, 32, 32)
    reference.eval()
    # The module itself, not an exported graph: it switches modes and trains further.
    assert type(loaded) is type(reference) and not loaded.training
    loaded.train()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    assert np.allclose(pyfunc.predict(x.numpy()), reference(x).detach().numpy(), atol=1e-5)
    # The weights are stored once, and the requirements pin what rebuilds the model.
    with tracking_uri_set(sqlite_uri):
        local = Path(mlflow.artifacts.download_artifacts(tracked.model_uri))
    model_files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    weights = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    stored = sum((local / p).stat().st_size for p in model_files)
    assert weights < stored < 1.5 * weights + 200_000, model_files
    assert not any(p.endswith((".safetensors", ".pt2")) for p in model_files)
    requirements = (local / "requirements.txt").read_text().splitlines()
    import timm

    from freezelab import __version__

    assert f"timm=={timm.__version__}" in requirements
    assert f"freezelab=={__version__}" in requirements


def test_registry_alias_and_chained_fine_tuning(tiny_config, sqlite_uri):
    config = _tracked(
        tiny_config,
        sqlite_uri,
        name="source",
        epochs=1,
        mlflow={"register_as": "digits-source", "alias": "best"},
    )
    tracked = train(config)
    outcome = tracked.outcome
    client = mlflow.MlflowClient(sqlite_uri, registry_uri=sqlite_uri)
    version = client.get_model_version_by_alias("digits-source", "best")
    assert version.run_id == tracked.run_id

    chained = _tracked(
        tiny_config,
        sqlite_uri,
        name="chained",
        epochs=1,
        model={"name": "test_resnet", "weights": "models:/digits-source@best"},
        policy={"type": "head_only"},
    )
    start = build_for_config(chained)
    source = build_for_config(config, with_weights=False)
    ckpt.load_model_weights(outcome.checkpoint_dir, source)
    # The logged model carries the labels it was trained on: the same task keeps its head.
    for (name, a), (_, b) in zip(
        start.state_dict().items(), source.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert head_init_tags(chained) == {
        "freezelab.head_init": "kept",
        "freezelab.head_init.reason": "same labels [0, 1, 2]",
    }

    # A new task with as many classes starts from a fresh head, and its run says why.
    new_task = chained.model_copy(
        update={"name": "new-task", "data": chained.data.model_copy(update={"classes": (5, 6, 7)})}
    )
    start = build_for_config(new_task)
    fresh = build_for_config(new_task, with_weights=False)
    assert torch.equal(start.fc.weight, fresh.fc.weight)
    assert torch.equal(start.conv1[0].weight, source.conv1[0].weight)
    run = _run(client, TrackedRun.start(new_task).run_id)
    assert run.data.params["model.head_init"] == "auto"
    assert run.data.tags["freezelab.head_init"] == "reset"
    assert run.data.tags["freezelab.head_init.reason"] == "labels differ: [5, 6, 7] vs [0, 1, 2]"


def test_each_epoch_is_logged_once_even_when_reported_twice(sqlite_uri):
    client = mlflow.MlflowClient(sqlite_uri)
    experiment = client.create_experiment("dups")
    run_id = client.create_run(experiment).info.run_id
    callback = MlflowMetricsCallback(sqlite_uri, run_id, "/nonexistent/spill.jsonl")
    for epoch in (0, 1, 1, 2, 1):  # a restart from an older checkpoint re-reports epoch 1
        callback.after_report(None, [{"epoch": epoch, "val_acc": epoch / 10, "phase": "x"}], None)
    fresh = MlflowMetricsCallback(
        sqlite_uri, run_id, "/nonexistent/spill.jsonl"
    )  # a new controller
    fresh.after_report(None, [{"epoch": 2, "val_acc": 0.2}], None)
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1, 2]


def test_lost_server_spills_then_catches_up(tmp_path, sqlite_uri):
    client = mlflow.MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("lost")).info.run_id
    spill = tmp_path / "pending.jsonl"
    callback = MlflowMetricsCallback("http://127.0.0.1:9", run_id, str(spill))
    with pytest.warns(RuntimeWarning, match="unreachable"):
        callback.after_report(None, [{"epoch": 0, "val_acc": 0.5}], None)
    assert json.loads(spill.read_text().splitlines()[0])["metrics"] == {"val_acc": 0.5}
    callback.tracking_uri = sqlite_uri  # the server is back
    callback.after_report(None, [{"epoch": 1, "val_acc": 0.6}], None)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc")] == [
        (0, 0.5),
        (1, 0.6),
    ]


def test_unreachable_server_fails_before_training(tiny_config, tmp_path):
    config = _tracked(tiny_config, "http://127.0.0.1:9", name="nowhere")
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        train(config)
    assert not (tmp_path / "runs" / "nowhere").exists()
    optional = _tracked(
        tiny_config, "http://127.0.0.1:9", name="optional", epochs=1, mlflow={"required": False}
    )
    assert train(optional).run_id is None


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri(None) == "http://server:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert flatten_params({"a": {"b": 1, "c": {"d": None}}}) == {"a.b": "1", "a.c.d": "None"}


def test_compare_lists_runs_by_policy(tiny_config, sqlite_uri, capsys):
    for policy in ({"type": "full"}, {"type": "last_n", "n": 1}):
        train(
            _tracked(tiny_config, sqlite_uri, name=f"cmp-{policy['type']}", epochs=1, policy=policy)
        )
    capsys.readouterr()
    assert main(["compare", "tests", "--tracking-uri", sqlite_uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["policy"] for r in rows) == ["full", "last_n(n=1)"]
    assert all(r["epochs"] == 1 for r in rows)
    # One definition of cost: the training passes, and the run's wall clock around them.
    assert all(0 < r["train_time_s"] < r["wall_time_s"] for r in rows)
    assert main(["compare", "tests", "--tracking-uri", sqlite_uri, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("policy,val_acc,best_val_acc")
    assert main(["compare", "missing", "--tracking-uri", sqlite_uri]) == 2


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"))
    server.start()
    yield server.uri
    server.stop()


def test_against_a_real_mlflow_server(tiny_config, mlflow_server):
    config = _tracked(tiny_config, mlflow_server, name="served", epochs=2)
    tracked = train(config)
    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(tracked.run_id, "val_acc")] == [0, 1]
    assert "config.yaml" in {a.path for a in client.list_artifacts(tracked.run_id)}
    with tracking_uri_set(mlflow_server):
        loaded = mlflow.pytorch.load_model(tracked.model_uri)
    assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.ray
def test_killed_worker_resumes_and_logs_each_epoch_once(
    ray_session, tiny_config, sqlite_uri, tmp_path
):
    from faults import KillRankAfterEpoch

    # Checkpoints after epochs 1 and 3; rank 1 dies after epoch 2's report, so the
    # restarted workers redo epoch 2 from the epoch-1 checkpoint and report it again.
    marker = tmp_path / "killed"
    config = _tracked(
        tiny_config,
        sqlite_uri,
        name="killed",
        epochs=4,
        max_failures=1,
        checkpoint={"every": 2},
        scaling={"num_workers": 2},
    )
    tracked = train(config, reporter=KillRankAfterEpoch(1, 2, marker))
    outcome = tracked.outcome
    assert marker.exists(), "the fault was not injected"
    assert outcome.metrics["epoch"] == 3
    client = mlflow.MlflowClient(sqlite_uri)
    for key in ("val_acc", "train_loss", "run/epoch"):
        assert [m.step for m in client.get_metric_history(tracked.run_id, key)] == [
            0,
            1,
            2,
            3,
        ], key


@pytest.mark.ray
def test_secrets_reach_the_workers_and_nothing_else(
    ray_session, tiny_config, mlflow_server, tmp_path, capfd
):
    """A secret in scaling.env_vars and a password in the tracking URI: the worker gets
    the variable, and neither is found in any param, tag, artifact, checkpoint file,
    run record or output line."""
    from faults import RecordEnv

    secret, password = "AKIA-not-a-real-secret-7f3a", "hunter2-pw-9c1e"
    host = mlflow_server.removeprefix("http://")
    config = _tracked(
        tiny_config,
        f"http://alice:{password}@{host}",
        name="secretive",
        epochs=1,
        scaling={"num_workers": 1, "env_vars": {"AWS_SECRET_ACCESS_KEY": secret}},
    )
    seen = tmp_path / "seen"
    seen.mkdir()
    tracked = train(config, reporter=RecordEnv("AWS_SECRET_ACCESS_KEY", seen))
    assert (seen / "rank-0").read_text() == secret

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(tracked.run_id)
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    scratch = tmp_path / "artifacts"
    texts += [
        path.read_text(errors="replace")
        for path in Path(client.download_artifacts(tracked.run_id, "", str(scratch))).rglob("*")
        if path.is_file()
    ]
    texts += [
        path.read_text(errors="replace")
        for path in Path(config.storage_path, config.name).rglob("*")
        if path.is_file() and path.suffix in (".json", ".yaml", ".jsonl", ".txt")
    ]
    out, err = capfd.readouterr()
    texts += [out, err]
    assert not any(k.startswith("scaling.env_vars") for k in run.data.params)
    for text in texts:
        assert secret not in text and password not in text


def test_compare_groups_repeats_with_their_interval(tiny_config, sqlite_uri, capsys):
    from freezelab.stats import summarize

    for policy in ({"type": "full"}, {"type": "head_only"}):
        for seed in (0, 1, 2):
            train(
                _tracked(
                    tiny_config,
                    sqlite_uri,
                    name=f"rep-{policy['type']}-{seed}",
                    epochs=1,
                    seed=seed,
                    policy=policy,
                )
            )
    capsys.readouterr()
    assert main(["compare", "tests", "--tracking-uri", sqlite_uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6
    for policy in ("full", "head_only"):
        group = [r for r in rows if r["policy"] == policy]
        # The default sort metric: the accuracy of the model each run hands over.
        expected = summarize([r["val_acc"] for r in group])
        for r in group:
            assert r["group"] == policy and r["n"] == 3
            assert r["mean"] == pytest.approx(expected.mean)
            assert r["ci95_low"] == pytest.approx(expected.ci95_low)
            assert r["ci95_high"] == pytest.approx(expected.ci95_high)
            assert r["train_time_s"] > 0 and r["wall_time_s"] > 0
    values = [r["val_acc"] for r in rows]
    assert values == sorted(values, reverse=True)
    assert main(["compare", "tests", "--tracking-uri", sqlite_uri]) == 0
    assert "mean ± ci95" in capsys.readouterr().out


def test_dataset_inputs_name_each_split_and_change_digest_with_the_data(tiny_config, tmp_path):
    from freezelab.mlflow.tracking import dataset_inputs

    folder = tmp_path / "night" / "cls0"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"one")
    config = tiny_config(data={"eval_sets": {"night": str(tmp_path / "night")}})

    def described(cfg):
        return {
            i.dataset.name: (i.dataset.source_type, i.dataset.digest, i.tags[0].value)
            for i in dataset_inputs(cfg)
        }

    before = described(config)
    assert {n: (s, c) for n, (s, _, c) in before.items()} == {
        "digits[0,1,2]/train": ("code", "training"),
        "digits[0,1,2]/val": ("code", "validation"),
        "digits[0,1,2]/night": ("local", "evaluation"),
    }
    (folder / "b.png").write_bytes(b"two")  # the folder changed: only its digest moves
    after = described(config)
    assert after["digits[0,1,2]/night"] != before["digits[0,1,2]/night"]
    assert after["digits[0,1,2]/train"] == before["digits[0,1,2]/train"]
    shifted = described(tiny_config(data={"shift": "invert"}))
    assert set(shifted) == {"digits[0,1,2]+invert/train", "digits[0,1,2]+invert/val"}


def test_runs_that_start_at_once_each_record_the_shared_datasets(tiny_config, sqlite_uri, tmp_path):
    """Sweep trials start together and log the same datasets into one experiment.
    MLflow's store looks a dataset up and then inserts it, so two at once collide on
    its key; each run must still open, with its datasets recorded."""
    import threading

    from freezelab.mlflow.run import TrackedRun

    runs, errors = {}, []
    barrier = threading.Barrier(6)

    def start(i, round_):
        # A new data config each round: datasets the experiment has not seen yet.
        data = {**tiny_config().data.model_dump(), "train_per_class": 20 + round_}
        config = _tracked(tiny_config, sqlite_uri, name=f"trial-{round_}-{i}", data=data)
        barrier.wait()
        try:
            runs[i] = TrackedRun.start(config).run_id
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    # The experiment exists already: the race is on the datasets, not on it.
    TrackedRun.start(_tracked(tiny_config, sqlite_uri, name="first"))
    for round_ in range(3):
        threads = [threading.Thread(target=start, args=(i, round_)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    for run_id in runs.values():
        names = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
        assert names == {"digits[0,1,2]/train", "digits[0,1,2]/val"}


def test_the_held_out_test_accuracy_is_a_final_metric_and_in_the_study_row(tiny_config, sqlite_uri):
    from freezelab.report.consequences import group_measures
    from freezelab.study_trials import study_row

    config = _tracked(
        tiny_config,
        sqlite_uri,
        name="held-out",
        data={"test_fraction": 0.2, "eval_shifts": ["rotate:90"]},
        mlflow={"log_model": False},
    )
    tracked = train(config)
    client = mlflow.MlflowClient(sqlite_uri)
    metrics = _run(client, tracked.run_id).data.metrics
    for key in ("test_acc", "test_loss", "shifted/test_acc/rotate:90"):
        # Logged once, at the last epoch: a final metric of the run, never a curve.
        history = client.get_metric_history(tracked.run_id, key)
        assert [m.step for m in history] == [config.epochs - 1], key
        assert metrics[key] == tracked.outcome.metrics[key]
    from freezelab.api import summarize

    # The run's closing lines name it, with its image count.
    summary = summarize(config, tracked)
    assert f"test_acc {metrics['test_acc']:.4f} on 107 held-out images" in summary
    # The cost it states is MLflow's cost/* family, under the same names.
    assert (
        f"cost: train_s {metrics['cost/train_s']:.1f}, wall_s {metrics['cost/wall_s']:.1f}, "
        f"gflops {metrics['cost/gflops']:,.1f}, train_images {metrics['cost/train_images']:,.0f}, "
        f"images_per_s {metrics['cost/images_per_s']:.0f}"
    ) in summary
    row = study_row(config, tracked, ())
    assert row["test_acc"] == metrics["test_acc"]
    assert row["test_evaluations"] == {"rotate:90": metrics["shifted/test_acc/rotate:90"]}
    assert row["evaluations"] == {"rotate:90": metrics["shifted/val_acc/rotate:90"]}
    group: dict = {}
    group_measures(group, [row, row])
    assert group["test_evaluations"] == ["rotate:90"]
    assert group["test_eval/rotate:90"] == pytest.approx(metrics["shifted/test_acc/rotate:90"])
    # A run without a test split: the fields are there, empty.
    without = _tracked(tiny_config, sqlite_uri, name="no-test", mlflow={"log_model": False})
    row = study_row(without, train(without), ())
    assert math.isnan(row["test_acc"]) and row["test_evaluations"] == {}
