"""Runs on object storage: ``storage_path: s3://...`` against a real S3 endpoint (moto's
server on 127.0.0.1, reached through ``AWS_ENDPOINT_URL`` as a user would).

One Ray Train run carries most assertions, as each costs seconds: it is killed after
its first epoch, resumes from its checkpoint on S3 and ends with the weights of an
uninterrupted run; its MLflow run (sqlite) is whole, its model built from the
checkpoint on S3; the same config again finds it complete there, another config is
refused, ``--overwrite`` moves it aside object by object, and ``freezelab sync`` of the
bucket finishes a run whose tracking server was away.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import mlflow
import pytest
import torch
from object_store import list_keys
from safetensors.torch import load_file

from freezelab import objectstore
from freezelab.cli import main
from freezelab.errors import ConfigError
from freezelab.trainers.checkpoint import read_state
from freezelab.trainers.launch import run_training
from freezelab.trainers.location import RECORD_FILE, RunLocation
from tests.conftest import TINY, merge


def _tracked(tiny_config, tmp_path, **update):
    return tiny_config(
        mlflow={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, **update
    )


@pytest.mark.ray
def test_a_run_on_s3_killed_after_an_epoch_resumes_from_s3_and_is_tracked(
    ray_session, tiny_config, s3_endpoint, s3_bucket, tmp_path
):
    from faults import KillRankAfterEpoch

    from freezelab.api import train
    from freezelab.mlflow.run import TrackedRun
    from freezelab.mlflow.sync import sync
    from freezelab.mlflow.tracked import SYNC_FILE, finish_or_defer

    storage = f"s3://{s3_bucket}/runs"
    common = {"epochs": 3, "policy": {"type": "gradual", "every": 1}}
    # The reference: the same training, uninterrupted, in one process on local disk.
    # One Ray Train worker of 1 CPU computes exactly what the loop computes in one
    # process with one thread (the thread count changes float reduction order).
    threads = torch.get_num_threads()
    try:
        single = tiny_config(name="reference", performance={"torch_threads": 1}, **common)
        reference = load_file(run_training(single).weights_file)
    finally:
        torch.set_num_threads(threads)

    marker = tmp_path / "killed"
    config = _tracked(
        tiny_config,
        tmp_path,
        name="on-s3",
        storage_path=storage,
        max_failures=1,
        checkpoint={"keep": 5},  # keep all: the test counts them
        scaling={"num_workers": 1},
        **common,
    )
    # The worker dies right after its report of epoch 1 (the second).
    tracked = train(config, reporter=KillRankAfterEpoch(0, 1, marker))
    outcome = tracked.outcome
    assert marker.exists(), "the fault was not injected"
    assert outcome.metrics["epoch"] == 2
    # The checkpoints are objects in the bucket; the outcome reads a local copy of the last.
    keys = list_keys(s3_endpoint, s3_bucket, "runs/on-s3/")
    assert f"runs/on-s3/{RECORD_FILE}" in keys
    checkpoints = sorted({k.split("/")[2] for k in keys if k.endswith("/model.safetensors")})
    epochs = [read_state(f"{storage}/on-s3/{name}")["epoch"] for name in checkpoints]
    # Resumed from a checkpoint on S3 (epoch 0's or 1's: Ray Train resumes from the
    # newest it registered), never from scratch: epoch 0 trained once.
    assert epochs.count(0) == 1 and epochs[-1] == 2, epochs
    assert outcome.checkpoint_location == f"{storage}/on-s3/{checkpoints[-1]}"
    assert Path(outcome.checkpoint_dir).is_dir() and "://" not in outcome.checkpoint_dir
    resumed = load_file(outcome.weights_file)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name

    # MLflow: each epoch once, and the logged model holds the checkpoint's weights.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracked.run_id, "run/epoch")] == [0, 1, 2]
    assert run.data.tags["freezelab.run_key"].startswith(f"{storage}/on-s3#")
    from freezelab.trainers.artifacts import download_weights
    from freezelab.trainers.checkpoint import load_weights_only

    logged = load_weights_only(download_weights(tracked.model_uri, uri, dst_path=tmp_path / "m"))
    assert all(torch.equal(logged[k], v) for k, v in reference.items())

    # The same config again: complete on S3, nothing trains.
    again = run_training(config)
    assert again.already_complete and again.checkpoint_location == outcome.checkpoint_location
    # Another config under the name: refused before anything is written.
    changed = config.model_copy(update={"epochs": 4})
    with pytest.raises(ConfigError, match=r"another config \(epochs: 3 -> 4\)"):
        run_training(changed)

    # A tracking server away at the end: the run's folder on S3 keeps what sync needs.
    late = client.create_run(run.info.experiment_id, run_name="late").info.run_id
    away = TrackedRun("http://127.0.0.1:9", late, run.info.experiment_id, "unused")
    impatient = config.model_copy(
        update={"mlflow": config.mlflow.model_copy(update={"sync_timeout_s": 0})}
    )
    assert finish_or_defer(away, impatient, outcome, wall_time_s=1.0) is None
    record = json.loads(objectstore.read_text(f"{storage}/on-s3/{SYNC_FILE}"))
    assert record["checkpoint"] == outcome.checkpoint_location
    assert record["checkpoint_in_run"] == outcome.checkpoint_location.removeprefix(
        f"{storage}/on-s3/"
    )
    assert sync(storage, tracking_uri=uri) == [late]
    assert client.get_run(late).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(late, "run/epoch")] == [0, 1, 2]
    assert f"runs/on-s3/{SYNC_FILE}" not in list_keys(s3_endpoint, s3_bucket)

    # --overwrite on S3: every object moved aside under NAME.replaced-TIMESTAMP.
    def objects(prefix: str) -> set[str]:  # without the folder markers
        keys = list_keys(s3_endpoint, s3_bucket, prefix)
        return {k.removeprefix(prefix) for k in keys if not k.endswith("/")}

    before = objects("runs/on-s3/")
    uid = RunLocation.of(changed).claim(changed, overwrite=True)
    aside = {
        k.split("/")[1] for k in list_keys(s3_endpoint, s3_bucket, "runs/") if ".replaced-" in k
    }
    assert len(aside) == 1 and aside.pop().startswith("on-s3.replaced-")
    moved = next(k for k in list_keys(s3_endpoint, s3_bucket, "runs/") if ".replaced-" in k)
    assert objects(f"runs/{moved.split('/')[1]}/") == before
    assert objects("runs/on-s3/") == {RECORD_FILE}
    new_record = json.loads(objectstore.read_text(f"{storage}/on-s3/{RECORD_FILE}"))
    assert new_record["uid"] == uid and new_record["config"]["epochs"] == 4


def test_a_run_in_one_process_on_s3_uploads_its_checkpoints_and_resumes_from_them(
    tiny_config, s3_endpoint, s3_bucket
):
    from faults import CrashAfterEpoch, Interrupted

    reference = load_file(run_training(tiny_config(name="ref", epochs=2)).weights_file)
    config = tiny_config(name="local-mode", epochs=2, storage_path=f"s3://{s3_bucket}/runs")
    where = RunLocation.of(config)
    with pytest.raises(Interrupted):
        run_training(config, reporter=CrashAfterEpoch(0, where.local_checkpoint_dir, 2))
    prefix = "runs/local-mode/local_checkpoints/"
    first = [k for k in list_keys(s3_endpoint, s3_bucket, prefix) if not k.endswith("/")]
    assert sorted(k.removeprefix(prefix) for k in first) == [
        "checkpoint_epoch=000000/model.safetensors",
        "checkpoint_epoch=000000/optimizer.pt",
        "checkpoint_epoch=000000/state.json",
    ]
    outcome = run_training(config)  # resumes from epoch 0's checkpoint, downloaded
    assert outcome.checkpoint_location.endswith("local_checkpoints/checkpoint_epoch=000001")
    resumed = load_file(outcome.weights_file)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_two_processes_claiming_one_name_on_s3_never_share_it(tiny_config, s3_bucket):
    first = tiny_config(name="race", epochs=1, storage_path=f"s3://{s3_bucket}/runs")
    other = tiny_config(name="race", epochs=2, storage_path=f"s3://{s3_bucket}/runs")
    where = RunLocation.of(first)
    where._record("theirs", other.safe_dict())
    with pytest.raises(ConfigError, match="just started by another process"):
        where._record("mine", first.safe_dict())
    assert where._record("mine", other.safe_dict()) == "theirs"


def _config_file(tmp_path: Path, storage_path: str) -> Path:
    config = merge(
        TINY,
        {
            "name": "bad",
            "storage_path": storage_path,
            "scaling": {"num_workers": 1},
            "mlflow": {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        },
    )
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(config))
    return path


def _one_line_error(tmp_path, capsys, storage_path: str) -> str:
    assert main(["train", str(_config_file(tmp_path, storage_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "mlflow.db").exists(), "MLflow was touched"
    return err


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses everything, as S3 does without permission."""

    def _deny(self):
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

    def log_message(self, *args):
        pass


def test_a_storage_path_on_s3_that_cannot_be_used_is_one_line_before_anything(
    tmp_path, capsys, monkeypatch, s3_endpoint, s3_bucket
):
    # A bucket that does not exist.
    err = _one_line_error(tmp_path, capsys, f"s3://no-such-{s3_bucket}/runs")
    assert err.startswith("freezelab train: error: storage_path:") and "no such bucket" in err
    # No permission: a real 403 from an endpoint that refuses every request.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        err = _one_line_error(tmp_path, capsys, f"s3://{s3_bucket}/runs")
        assert "access denied" in err, err
    finally:
        server.shutdown()
    # An endpoint that does not answer (a closed port).
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    err = _one_line_error(tmp_path, capsys, f"s3://{s3_bucket}/runs")
    assert "endpoint unreachable" in err, err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert list_keys(s3_endpoint, s3_bucket) == [], "something was created"


def test_submit_warns_of_s3_storage_it_cannot_open_here(tmp_path, s3_bucket):
    # The cluster may hold the only credentials: the job checks the storage there.
    from freezelab.submit import _validate

    path = _config_file(tmp_path, f"s3://no-such-{s3_bucket}/runs")
    name, warnings = _validate("train", path, [])
    assert name == "bad"
    assert any("no such bucket" in w and "checks it again on the cluster" in w for w in warnings)
